"""evaluate on a web-like pool: kinds and junk ride along, balanced and worst-class accuracy, what
each subset keeps, the label oracle, paired differences against random, fixed training steps."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipelines.cli.config import EvaluateConfig, validate_config
from prune import evaluate as ev
from prune.evaluate.settings import CnnConfig, LinearProbeConfig


def test_junk_keeps_its_kind_and_label_and_has_no_class():
    junk = json.dumps({"label": -1, "kind": "junk"}).encode()
    assert ev.parse_label(junk, "label") == (ev.JUNK_LABEL, None)
    assert ev.parse_label(json.dumps({"label": -1}).encode(), "label") == (None, ev.EXCLUDED_BAD_LABEL)
    assert ev.parse_kind(junk) == "junk" and ev.parse_kind(json.dumps({"label": 3}).encode()) == "original"
    assert ev.parse_kind(b"not json") == "original" and ev.parse_kind(None) == "original"
    classes, (a, b) = ev.class_indices(np.array([3, -1, 7, 3]), np.array([7, 3]))
    assert list(classes) == [3, 7] and list(a) == [0, -1, 1, 0] and list(b) == [1, 0]


def test_scores_balanced_and_worst_three():
    labels = np.array([0] * 10 + [1] * 10 + [2] * 10 + [3] * 70)
    pred = labels.copy()
    pred[:5] = 1  # class 0: 50%
    pred[10:12] = 0  # class 1: 80%
    pred[30:44] = 0  # class 3: 80%
    s = ev.scores(pred, labels, 4)
    assert s[ev.ACCURACY] == pytest.approx(79 / 100)
    assert s[ev.BALANCED_ACCURACY] == pytest.approx((0.5 + 0.8 + 1.0 + 0.8) / 4)
    assert s[ev.WORST3_ACCURACY] == pytest.approx((0.5 + 0.8 + 0.8) / 3)


def test_kept_junk_costs_budget_and_teaches_nothing():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-2, 1, (40, 4)), rng.normal(2, 1, (40, 4)), rng.normal(0, 5, (40, 4))]).astype(np.float32)
    y = np.array([0] * 40 + [1] * 40 + [-1] * 40)
    res = ev.train_linear_probe(x, y, x[:80], y[:80], 2, LinearProbeConfig(max_iter=50), 0)
    assert res[ev.N_TRAIN] == 120 and res[ev.ACCURACY] > 0.9  # junk counted, not learned as a class
    only_junk = ev.train_linear_probe(x[80:], y[80:], x[:80], y[:80], 2, LinearProbeConfig(max_iter=5), 0)
    assert only_junk[ev.N_TRAIN] == 40 and math.isnan(only_junk[ev.ACCURACY])


def test_fixed_steps_train_every_subset_alike():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 255, (300, 12, 12, 3)).astype(np.uint8)
    y = rng.integers(0, 3, 300)
    cfg = CnnConfig(epochs=5, min_steps=1, batch_size=16, width=4, image_size=12, steps=7)
    small = ev.train_cnn(pixels[:20], y[:20], pixels[:50], y[:50], 3, cfg, 0)
    large = ev.train_cnn(pixels, y, pixels[:50], y[:50], 3, cfg, 0)
    assert small[ev.STEPS] == large[ev.STEPS] == 7
    assert ev.train_cnn(pixels, y, pixels[:50], y[:50], 3, cfg.model_copy(update={"steps": None}), 0)[ev.STEPS] == 5 * (300 // 16)


def test_oracle_keeps_originals_evenly_across_classes():
    rng = np.random.default_rng(2)
    labels = np.concatenate([np.repeat(np.arange(4), [300, 120, 40, 10]), np.repeat([0, 1], 100), [-1] * 30])
    kinds = np.array(["original"] * 470 + ["copy"] * 200 + ["junk"] * 30, dtype=object)
    perm = rng.permutation(len(labels))
    labels, kinds = labels[perm], kinds[perm]
    fractions = [0.1, 0.3, 0.5, 0.9]
    bands = ev.oracle_bands(fractions, labels, kinds, 0)
    previous = set()
    for i, f in enumerate(fractions):
        idx = ev.kept_indices(bands, i)
        assert (kinds[idx] == "original").all()
        assert len(idx) == min(int(np.floor(f * len(labels) + 0.5)), 470)
        per = np.bincount(labels[idx], minlength=4)
        sizes = np.array([300, 120, 40, 10])
        cap = max(x for x in range(301) if np.minimum(sizes, x).sum() <= len(idx))
        assert (per >= np.minimum(sizes, cap)).all() and (per <= np.minimum(sizes, cap + 1)).all()
        assert previous <= set(idx)
        previous = set(idx)
    assert not (ev.oracle_bands(fractions, labels, kinds, 1) == bands).all()  # seeded inside a class


def test_subset_stats_and_paired_differences():
    kinds = np.array(["original"] * 6 + ["copy"] * 3 + ["junk"], dtype=object)
    cluster = np.array([0, 0, 1, 1, 2, 2, 0, 0, 1, 3])
    s = ev.subset_stats(np.array([0, 6, 7, 9]), kinds, cluster)
    assert math.isnan(s.pop(ev.MISCAPTIONED_KEPT))  # the json says nothing of the captions
    assert s == {ev.COPIES_KEPT: pytest.approx(2 / 3), ev.JUNK_KEPT: 1.0, ev.CLUSTERS_COVERED: 2.0}
    captions = np.array(["describes", "wrong", "noise", None, "describes", "empty", "describes", "spam", "describes", None],
                        dtype=object)
    assert ev.subset_stats(np.array([0, 1, 7]), kinds, cluster, captions)[ev.MISCAPTIONED_KEPT] == 0.5  # 2 of 4
    rows = [{ev.CLASSIFIER: "cnn", ev.POLICY: p, ev.KEEP_FRACTION: 0.5, ev.SEED: seed, ev.BALANCED_ACCURACY: acc}
            for p, seed, acc in (("random", 0, 0.70), ("random", 1, 0.74), ("hard", 0, 0.75), ("hard", 1, 0.76))]
    d = ev.paired_differences(rows, ev.BALANCED_ACCURACY)[("cnn", "hard", 0.5)]
    assert d["pairs"] == 2 and d["mean"] == pytest.approx(0.035) and d["std"] == pytest.approx(np.std([0.05, 0.02], ddof=1))


def test_policies_name_budgets_and_the_oracle():
    base = {"output": "o", "train_input": "a", "test_input": "b"}
    cfg = validate_config(base | {"evaluate": {"policies": ["random", "capped-stratified", "dbp-hard", "oracle"]}},
                          EvaluateConfig)
    assert cfg.evaluate.policies[-1] == "oracle"
    assert ev.select_config("capped-stratified", 0.3, 4).model_dump() | {} == {
        **ev.select_config("stratified", 0.3, 4).model_dump(), "balanced": True, "budget": "capped_equal"}


def test_dedup_before_a_policy_keeps_subset_sizes_and_drops_the_removed():
    rng = np.random.default_rng(4)
    base = rng.normal(size=(60, 6))
    x = np.concatenate([base, base[:30] + rng.normal(scale=1e-3, size=(30, 6))])  # 30 near-copies
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    cluster = rng.integers(0, 3, 90)
    cluster[60:] = cluster[:30]  # a copy sits in its original's cluster
    distance = rng.uniform(0.1, 0.5, 90)
    shards = np.array(["00000"] * 90, dtype=object)
    keys = np.array([f"{i:09d}" for i in range(90)], dtype=object)
    from prune.dedup.settings import DedupConfig

    removed = ev.near_duplicates(x, distance, cluster, shards, keys, DedupConfig(eps=0.01))
    assert removed.sum() == 30 and (removed[:30] ^ removed[60:]).all()  # one of each pair
    bands = ev.bands_after_dedup("capped-random", [0.2, 0.5, 0.9], removed, distance, cluster, 3, shards, keys, 0)
    for i, f in enumerate([0.2, 0.5, 0.9]):
        idx = ev.kept_indices(bands, i)
        assert not removed[idx].any() and len(idx) == min(int(np.floor(f * 90 + 0.5)), 60)


@pytest.fixture(scope="module")
def web_eval(ray_cluster, tmp_path_factory):
    from pipelines.cli import evaluate
    from prune.demo.shards import write_demo_shards
    from prune.demo.web_like import write_web_like_shards

    root = tmp_path_factory.mktemp("web")
    pool = write_web_like_shards(str(root / "train"), count=600, shard_size=200, seed=3)
    write_demo_shards(str(root / "test"), split="test", count=200, shard_size=100)
    cfg = validate_config({
        "train_input": str(root / "train"), "test_input": str(root / "test"), "output": str(root / "out"),
        "decode": {"batch_size": 64},
        "embed": {"backend": "timm", "model": "test_vit", "allow_random_init": True, "precision": "fp32",
                  "batch_size": 64, "torch_threads": 1},
        "kmeans": {"k": 4, "niter": 5},
        "evaluate": {"keep_fractions": [0.3, 1.0], "policies": ["random", "capped-stratified", "dedup+capped-stratified", "oracle"],
                     "dedup": {"eps": 0.02},
                     "seeds": [0, 1], "classifiers": ["linear"], "linear": {"max_iter": 20}},
    }, EvaluateConfig)
    return {"root": root, "composition": pool.composition, "cfg": cfg, "result": evaluate(cfg)}


def test_evaluate_on_a_web_like_pool_reports_what_each_subset_keeps(web_eval):
    rows = ev.read_results_csv(open(web_eval["result"].csv, "rb").read())
    kinds = web_eval["composition"]["kinds"]
    assert kinds["junk"] > 0 and kinds["copy"] > 0
    summary = json.loads(open(web_eval["result"].summary).read())
    assert summary["pool"]["n_pool"] == 600  # junk included: it is what a policy must avoid
    for r in rows:
        assert 0 <= r[ev.BALANCED_ACCURACY] <= 1 and 0 <= r[ev.WORST3_ACCURACY] <= r[ev.BALANCED_ACCURACY] + 1e-9
        if r[ev.KEEP_FRACTION] == 1.0 and r[ev.POLICY] in ("random", "capped-stratified"):
            assert r[ev.COPIES_KEPT] == 1.0 and r[ev.JUNK_KEPT] == 1.0 and r[ev.CLUSTERS_COVERED] == 4
        if r[ev.POLICY] == "dedup+capped-stratified" and r[ev.KEEP_FRACTION] == 1.0:  # what dedup left
            assert r[ev.COPIES_KEPT] < 1.0 and r[ev.N_TRAIN] == 600 - summary["prototypes"]["dedup_removed"]
        if r[ev.POLICY] == "oracle":
            assert r[ev.COPIES_KEPT] == 0.0 and r[ev.JUNK_KEPT] == 0.0
    random_03 = [r for r in rows if r[ev.POLICY] == "random" and r[ev.KEEP_FRACTION] == 0.3]
    assert len(random_03) == 2 and all(0.1 < r[ev.COPIES_KEPT] < 0.5 for r in random_03)
    dedup_03 = [r for r in rows if r[ev.POLICY] == "dedup+capped-stratified" and r[ev.KEEP_FRACTION] == 0.3]
    survivors = 600 - summary["prototypes"]["dedup_removed"]
    assert summary["prototypes"]["dedup_removed"] > 0
    # the same subset sizes as without dedup, or every survivor when fewer are left
    assert [r[ev.N_TRAIN] for r in dedup_03] == [min(r[ev.N_TRAIN], survivors) for r in random_03]
    md = open(web_eval["result"].markdown).read()
    assert "Balanced accuracy minus random's, paired by seed" in md and "| capped-stratified |" in md
    assert "## What each subset keeps" in md and "| oracle | 0% / 0% /" in md


def test_new_dedup_settings_train_only_the_dedup_rows_again(web_eval):
    from pipelines.cli import evaluate

    before = {(r[ev.POLICY], r[ev.KEEP_FRACTION], r[ev.SEED]): r
              for r in ev.read_results_csv(open(web_eval["result"].csv, "rb").read())}
    cfg = web_eval["cfg"].model_copy(deep=True)
    cfg.evaluate.dedup.keep = "nearest"
    again = evaluate(cfg)
    rows = ev.read_results_csv(open(again.csv, "rb").read())
    dedup_trainings = [r for r in rows if r[ev.POLICY].startswith(ev.DEDUP_PREFIX) and not r[ev.SHARED_FROM]]
    assert again.trained_now == len(dedup_trainings) >= 1  # those alone were trained again
    for r in rows:
        old = before[(r[ev.POLICY], r[ev.KEEP_FRACTION], r[ev.SEED])]
        same = r[ev.FINGERPRINT] == old[ev.FINGERPRINT]
        assert same != r[ev.POLICY].startswith(ev.DEDUP_PREFIX)
        if same:
            assert r[ev.TRAIN_SECONDS] == old[ev.TRAIN_SECONDS]  # reused, not trained again
