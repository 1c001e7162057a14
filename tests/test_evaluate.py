"""`ssl-prune evaluate`: selections are the select stage's, classifiers learn, the grid writes its outputs.

The end-to-end test runs the real thing on a tiny grid: Fashion-MNIST shards (one of them with a
bad label and a sample without a .json), the embed stage on Ray with a random-init timm model,
faiss prototypes, both classifiers, then a resumed re-run and a smaller pool.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.cli.config import EvaluateConfig, validate_config
from prune import evaluate as ev
from prune import schema
from prune.demo.shards import encode_image, tar_bytes, write_demo_shards
from prune.evaluate.settings import CnnConfig, LinearProbeConfig
from prune.io.shards import TarSample
from prune.io.storage import OutputDir
from prune.settings import ConfigError

from .conftest import REPO, n_keep

# --- labels ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "member, label, why",
    [
        (b'{"label": 3}', 3, None),
        (b'{"label": "7"}', 7, None),
        (b'{"label": 2.0}', 2, None),
        (b'{"label": "shirt"}', None, ev.EXCLUDED_BAD_LABEL),
        (b'{"label": -1}', None, ev.EXCLUDED_BAD_LABEL),
        (b'{"label": true}', None, ev.EXCLUDED_BAD_LABEL),
        (b'{"label": 2.5}', None, ev.EXCLUDED_BAD_LABEL),
        (b'{"label": "\\u00b3"}', None, ev.EXCLUDED_BAD_LABEL),  # a superscript 3: a digit, not a number
        (b'{"caption": "x"}', None, ev.EXCLUDED_NO_LABEL),
        (b'{"label": null}', None, ev.EXCLUDED_NO_LABEL),
        (b"[1, 2]", None, ev.EXCLUDED_NO_LABEL),
        (b"{not json", None, ev.EXCLUDED_BAD_JSON),
        (None, None, ev.EXCLUDED_NO_JSON),
    ],
)
def test_parse_label(member, label, why):
    assert ev.parse_label(member, "label") == (label, why)


def _sample(key: str, members: dict[str, bytes]) -> TarSample:
    s = TarSample(key)
    for ext, data in members.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        s.members.append((info, data))
    return s


def test_bad_labels_and_failed_samples_are_excluded_with_their_reason():
    jpg = encode_image(np.full((28, 28), 200, np.uint8))
    samples = [
        _sample("a", {"jpg": jpg, "json": b'{"label": 1}'}),
        _sample("b", {"jpg": jpg, "json": b'{"label": "shirt"}'}),
        _sample("c", {"jpg": jpg}),
        _sample("d", {"jpg": b"not an image", "json": b'{"label": 2}'}),
        _sample("e", {"jpg": jpg, "json": b'{"label": 4}'}),
    ]
    keys = ["a", "b", "c", "d", "e", "f", "g"]
    statuses = ["ok", "ok", "ok", "ok", "ok", schema.STATUS_UNDECODABLE, "ok"]  # g: not in the tar any more
    vectors = np.eye(6, 4, dtype=np.float32) + 0.1
    vectors[4] = np.nan  # e: the model gave NaN
    spec = ev.PreprocessSpec(size=16)
    got = ev.join_labels("00007", keys, statuses, vectors, samples, "label", ["jpg"], spec)
    # d's image does not decode: with pixels it is excluded, without it is used
    assert list(got.keys) == ["a"] and list(got.labels) == [1] and list(got.shards) == ["00007"]
    assert got.pixels.shape == (1, 16, 16, 3) and got.pixels.dtype == np.uint8
    assert np.allclose(np.linalg.norm(got.embeddings, axis=1), 1.0)
    assert got.excluded == {
        ev.EXCLUDED_BAD_LABEL: 1, ev.EXCLUDED_NO_JSON: 1, schema.STATUS_UNDECODABLE: 2,
        schema.STATUS_BAD_EMBEDDING: 1, ev.EXCLUDED_NOT_IN_TAR: 1,
    }
    no_pixels = ev.join_labels("00007", keys, statuses, vectors, samples, "label", ["jpg"], None)
    assert list(no_pixels.keys) == ["a", "d"] and no_pixels.pixels is None
    assert no_pixels.excluded[schema.STATUS_UNDECODABLE] == 1


# --- selection -----------------------------------------------------------------------------------


def _fake_pool(n_shards=3, per_shard=80, k=4, seed=0):
    """Scored shards as the assign stage leaves them: keys, status, cluster, float32 distance."""
    rng = np.random.default_rng(seed)
    shards = []
    for s in range(n_shards):
        cluster = rng.integers(0, k, per_shard).astype(np.int32)
        distance = rng.normal(0.3 + 0.05 * cluster, 0.08).clip(0, 2).astype(np.float32)
        status = np.array(["ok"] * per_shard, dtype=object)
        if s == 1:
            status[[3, 10, 11]] = schema.STATUS_UNDECODABLE
        shards.append({"shard": f"{s:05d}", "keys": np.array([f"{s:05d}{i:04d}" for i in range(per_shard)], dtype=object),
                       "cluster": cluster, "distance": distance, "status": status})
    return shards


def _pool_of(shards):
    """The ok rows of every shard, in shard order: what the evaluation's pool holds."""
    cat = {name: np.concatenate([s[name][s["status"] == "ok"] for s in shards]) for name in ("keys", "cluster", "distance")}
    cat["shards"] = np.concatenate([np.full(int((s["status"] == "ok").sum()), s["shard"], dtype=object) for s in shards])
    return cat


def test_in_memory_selection_is_exactly_the_select_stage(ray_cluster, tmp_path):
    from pipelines.stage import Context
    from pipelines.stages.select import SelectStage
    from prune.io.tables import assignment, npy_bytes

    k, fractions, seed = 4, [0.3, 0.75], 5
    shards = _fake_pool(k=k)
    out = OutputDir(str(tmp_path / "run"))
    for s in shards:
        ok = s["status"] == "ok"
        table = pa.table({schema.KEY: pa.array(s["keys"], pa.string()), schema.SHARD: pa.array([s["shard"]] * len(ok), pa.string()),
                          schema.STATUS: pa.array(s["status"], pa.string())})
        cluster = np.where(ok, s["cluster"], -1).astype(np.int32)
        with out.open_atomic(schema.ASSIGN_DIR, f"{s['shard']}.parquet") as f:
            pq.write_table(assignment(table, cluster, np.where(ok, s["distance"], np.nan), ok), f)
    urls = {s["shard"]: f"/nowhere/{s['shard']}.tar" for s in shards}
    # what the select stage reads of the prototypes: k, and the centroids (for the dbp budget)
    out.write_json({"k": k}, schema.PROTOTYPES_DIR, schema.KMEANS_META_FILE)
    centroids = np.random.default_rng(1).normal(size=(k, 8)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    out.write_bytes(npy_bytes(centroids), schema.PROTOTYPES_DIR, schema.CENTROIDS_FILE)
    pool = _pool_of(shards)
    for policy in ("hard", "balanced-easy", "random", "balanced-random", "capped-hard", "dbp-random", "stratified",
                   "capped-stratified"):
        bands = ev.select_bands(policy, fractions, pool["distance"], pool["cluster"], k, pool["shards"], pool["keys"], seed,
                                centroids)
        for i, f in enumerate(fractions):
            stage = SelectStage(select=ev.select_config(policy, f, seed))
            stage.run(Context(out, urls, fingerprint=f"{policy}@{f}"))
            scores = pa.concat_tables(pq.read_table(out.path(schema.SCORES_DIR, f"{s}.parquet")) for s in sorted(urls))
            keep = scores.column(schema.KEEP).to_numpy(zero_copy_only=False)
            by_stage = set(zip(scores.column(schema.SHARD).to_numpy(zero_copy_only=False)[keep],
                               scores.column(schema.KEY).to_numpy(zero_copy_only=False)[keep]))
            idx = ev.kept_indices(bands, i)
            assert set(zip(pool["shards"][idx], pool["keys"][idx])) == by_stage, (policy, f)


@pytest.mark.parametrize("policy", ["hard", "easy", "random", "balanced-hard", "balanced-easy", "balanced-random",
                                    "stratified", "balanced-stratified"])
def test_selection_keeps_the_counts_rule_nested_and_all_at_one(policy):
    pool = _pool_of(_fake_pool(n_shards=4, per_shard=150, k=5, seed=2))
    fractions = [0.1, 0.25, 0.5, 0.9, 1.0]
    bands = ev.select_bands(policy, fractions, pool["distance"], pool["cluster"], 5, pool["shards"], pool["keys"], 0)
    _, balanced = ev.split_policy(policy)
    previous = set()
    for i, f in enumerate(fractions):
        idx = ev.kept_indices(bands, i)
        if balanced:
            for c in range(5):
                in_c = pool["cluster"] == c
                assert np.isin(np.nonzero(in_c)[0], idx).sum() == n_keep(f, int(in_c.sum()))
        else:
            assert len(idx) == n_keep(f, len(pool["keys"]))
        assert previous <= set(idx)  # a smaller fraction is a subset of a larger one
        previous = set(idx)
    assert len(ev.kept_indices(bands, len(fractions) - 1)) == len(pool["keys"])
    if policy.endswith("hard") or policy.endswith("easy"):  # the hard ones are the far ones
        idx = ev.kept_indices(bands, 1)
        rest = np.setdiff1d(np.arange(len(bands)), idx)
        far = pool["distance"][idx].mean() > pool["distance"][rest].mean()
        assert far == policy.endswith("hard")


@pytest.mark.parametrize("policy", ["capped-hard", "capped-easy", "dbp-hard", "dbp-random"])
def test_budgeted_selection_keeps_each_clusters_budget_in_its_order(policy):
    """Per cluster: exactly the budget's count (capped-equal against a brute-force cap), the total
    floor(f * N + 0.5), nested across fractions, and inside a cluster the policy's order."""
    shards = _fake_pool(n_shards=4, per_shard=150, k=5, seed=3)
    pool = _pool_of(shards)
    keep = np.isin(pool["cluster"], [0, 1]) | (np.arange(len(pool["cluster"])) % 7 == 0)  # long-tailed sizes
    pool = {name: v[keep] for name, v in pool.items()}
    sizes = np.bincount(pool["cluster"], minlength=5)
    centroids = np.eye(5, 8, dtype=np.float32)
    fractions = [0.1, 0.3, 0.6, 1.0]
    bands = ev.select_bands(policy, fractions, pool["distance"], pool["cluster"], 5, pool["shards"], pool["keys"], 0,
                            centroids)
    previous = set()
    for i, f in enumerate(fractions):
        idx = ev.kept_indices(bands, i)
        budget = int(np.floor(f * sizes.sum() + 0.5))
        assert len(idx) == budget
        per = np.bincount(pool["cluster"][idx], minlength=5)
        if policy.startswith("capped"):
            cap = max(x for x in range(sizes.max() + 1) if np.minimum(sizes, x).sum() <= budget)
            assert (per >= np.minimum(sizes, cap)).all() and (per <= np.minimum(sizes, cap + 1)).all()
        assert (per <= sizes).all() and previous <= set(idx)
        previous = set(idx)
        if policy.endswith("hard"):
            for c in range(5):
                kept_c = pool["distance"][idx][pool["cluster"][idx] == c]
                rest_c = pool["distance"][np.setdiff1d(np.arange(len(bands)), idx)]
                rest_c = rest_c[pool["cluster"][np.setdiff1d(np.arange(len(bands)), idx)] == c]
                if len(kept_c) and len(rest_c):
                    assert kept_c.min() >= rest_c.max()


def test_identical_subsets_are_trained_once():
    pool = _pool_of(_fake_pool(n_shards=2, per_shard=50))
    fractions, policies, seeds = [0.5, 1.0], ["hard", "easy", "random"], [0, 1]
    bands = {(p, s): ev.select_bands(p, fractions, pool["distance"], pool["cluster"], 4, pool["shards"], pool["keys"], s)
             for p in policies for s in seeds}
    groups = ev.plan_runs(["cnn"], policies, fractions, seeds, bands)
    assert sum(len(g.specs) for g in groups) == 12
    assert len(groups) == 8  # 1.0 is the whole pool: one training per seed instead of three
    for g in groups:
        if g.lead.keep_fraction == 1.0:
            assert [s.policy for s in g.specs] == policies and len(g.train_idx) == len(pool["keys"])
    # the linear probe ignores its seed: hard@0.5 and easy@0.5 once each, random@0.5 once per seed
    # (its selection depends on the seed), 1.0 once for everything
    linear = ev.plan_runs(["linear"], policies, fractions, seeds, bands)
    assert sum(len(g.specs) for g in linear) == 12 and len(linear) == 5


def test_labels_become_class_indices_however_they_are_numbered():
    classes, (a, b) = ev.class_indices(np.array([7, 1_000_000, 7]), np.array([3, 7]))
    assert list(classes) == [3, 7, 1_000_000] and list(a) == [1, 2, 1] and list(b) == [0, 1]


def test_pool_is_seeded_and_refuses_more_than_there_is():
    a, b = ev.draw_pool(1000, 100, 3), ev.draw_pool(1000, 100, 3)
    assert np.array_equal(a, b) and len(np.unique(a)) == 100 and not np.array_equal(a, ev.draw_pool(1000, 100, 4))
    assert np.array_equal(ev.draw_pool(7, None, 0), np.arange(7))
    with pytest.raises(ValueError, match="pool_size"):
        ev.draw_pool(50, 60, 0)


# --- classifiers ------------------------------------------------------------------------------------


def _blobs(n, dim=16, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(0, 1, (classes, dim)) * 1.5
    y = rng.integers(0, classes, n)
    return (centres[y] + rng.normal(0, 1, (n, dim))).astype(np.float32), y.astype(np.int64)


def test_linear_probe_learns_a_separable_problem_deterministically():
    x, y = _blobs(600)
    train_x, test_x = ev.standardize(x[:300], x[300:])
    cfg = LinearProbeConfig(max_iter=100)
    a = ev.train_linear_probe(train_x, y[:300], test_x, y[300:], 3, cfg, seed=1)
    b = ev.train_linear_probe(train_x, y[:300], test_x, y[300:], 3, cfg, seed=1)
    assert a[ev.ACCURACY] > 0.9  # chance is 1/3
    assert a[ev.ACCURACY] == b[ev.ACCURACY] and a[ev.STEPS] == 100 and a[ev.N_TRAIN] == 300
    shuffled = ev.train_linear_probe(train_x, np.random.default_rng(0).permutation(y[:300]), test_x, y[300:], 3, cfg, 1)
    assert shuffled[ev.ACCURACY] < 0.6  # it learns from the labels, not from the test set


def test_an_empty_subset_is_a_missing_score_not_a_crash():
    x, y = _blobs(20)
    px = np.zeros((20, 12, 12, 3), np.uint8)
    lin = ev.train_linear_probe(x[:0], y[:0], x, y, 3, LinearProbeConfig(), 0)
    cnn = ev.train_cnn(px[:0], y[:0], px, y, 3, CnnConfig(image_size=12), 0)
    for res in (lin, cnn):
        assert math.isnan(res[ev.ACCURACY]) and res[ev.N_TRAIN] == 0 and res[ev.N_TEST] == 20
    rows = [{ev.CLASSIFIER: "linear", ev.POLICY: p, ev.KEEP_FRACTION: 0.1, ev.SEED: 0, ev.N_TRAIN: 0,
             ev.ACCURACY: acc, ev.SHARED_FROM: ""} for p, acc in (("hard", float("nan")), ("easy", 0.5))]
    md = ev.markdown_table(rows, ["linear"], ["hard", "easy"], [0.1], {"pool": "all", "n_pool": 9, "model_id": "m",
                                                                      "k": 2, "n_test": 20, "seeds": [0]})
    assert "| hard | – |" in md and "| easy | 50.0 |" in md and "0.1 easy" in md


def test_cnn_learns_where_the_square_is():
    rng = np.random.default_rng(0)
    n = 240
    y = rng.integers(0, 2, n)
    pixels = rng.integers(0, 60, (n, 20, 20, 3)).astype(np.uint8)
    for i, label in enumerate(y):  # class 0: a bright square at the top, class 1: at the bottom
        r = 2 if label == 0 else 12
        pixels[i, r : r + 6, 7:13] = 230
    cfg = CnnConfig(epochs=1, min_steps=60, batch_size=32, lr=5e-3, width=8, image_size=20)
    res = ev.train_cnn(pixels[:160], y[:160], pixels[160:], y[160:], 2, cfg, seed=0)
    assert res[ev.ACCURACY] > 0.9 and res[ev.STEPS] == 60


def test_augmentation_only_shifts_and_flips_and_is_seeded():
    import torch

    pixels = np.random.default_rng(0).integers(0, 255, (16, 10, 10, 3)).astype(np.uint8)
    out = ev.shift_and_flip(pixels, torch.Generator().manual_seed(3))
    assert out.shape == pixels.shape and out.dtype == np.uint8
    assert np.array_equal(out, ev.shift_and_flip(pixels, torch.Generator().manual_seed(3)))
    padded = np.pad(pixels, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
    for i in range(len(pixels)):
        views = [padded[i, dy : dy + 10, dx : dx + 10] for dy in range(5) for dx in range(5)]
        assert any(np.array_equal(out[i], v) or np.array_equal(out[i], v[:, ::-1]) for v in views)
    assert not all(np.array_equal(out[i], pixels[i]) for i in range(len(pixels)))


def test_shipped_configs_follow_the_protocol_the_docs_report():
    """What the tables of docs/evaluation.md rest on: every shipped evaluate config compares with random
    over at least 5 seeds, trains every subset for the same number of CNN steps, and covers 0.3 and 0.5."""
    from pipelines.cli.config import load_config

    for name in ("evaluate_fmnist.yaml", "evaluate_web.yaml"):
        cfg = load_config(str(Path(REPO, "configs", name)), ["evaluate.pool_size=5000"], EvaluateConfig)
        e = cfg.evaluate
        assert "random" in e.policies and len(e.seeds) >= 5 and e.cnn.steps, name
        assert {0.3, 0.5} <= set(e.keep_fractions) and cfg.embed.backend == "local", name


# --- end to end: `evaluate` on a tiny grid ---------------------------------------------------------


def _bad_label_shard(path, donor_tar):
    """A shard of three real images: a good label, a non-integer label, and no .json at all."""
    with tarfile.open(donor_tar) as tar:
        jpgs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")][:3]
    members = [
        ("000030000.jpg", jpgs[0]), ("000030000.json", json.dumps({"label": 4}).encode()),
        ("000030001.jpg", jpgs[1]), ("000030001.json", json.dumps({"label": "shirt"}).encode()),
        ("000030002.jpg", jpgs[2]),
    ]
    path.write_bytes(tar_bytes(members))


POLICIES = ["hard", "random", "balanced-easy"]
FRACTIONS = [0.5, 1.0]


def _eval_config(root, **evaluate) -> EvaluateConfig:
    return validate_config({
        "train_input": str(root / "train"),
        "test_input": str(root / "test"),
        "output": str(root / "out"),
        "decode": {"batch_size": 64},
        "embed": {"backend": "timm", "model": "test_vit", "allow_random_init": True, "precision": "fp32",
                  "batch_size": 64, "torch_threads": 1},
        "kmeans": {"k": 3, "niter": 5},
        "evaluate": {
            "keep_fractions": FRACTIONS, "policies": POLICIES, "seeds": [0],
            "linear": {"max_iter": 20}, "cnn": {"epochs": 1, "min_steps": 4, "batch_size": 32, "width": 8},
        } | evaluate,
    }, EvaluateConfig)


@pytest.fixture(scope="module")
def tiny_eval(ray_cluster, tmp_path_factory):
    from pipelines.cli import evaluate

    root = tmp_path_factory.mktemp("eval")
    train = write_demo_shards(str(root / "train"), split="train", count=300, shard_size=100)
    write_demo_shards(str(root / "test"), split="test", count=200, shard_size=100)
    _bad_label_shard(root / "train" / "00003.tar", train[0])
    cfg = _eval_config(root)
    return {"root": root, "cfg": cfg, "result": evaluate(cfg)}


def _csv_rows(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_evaluate_writes_every_run_table_and_plot(tiny_eval):
    result, root = tiny_eval["result"], tiny_eval["root"]
    pool = root / "out" / ev.pool_dir(None)
    assert result.csv == str(pool / ev.RESULTS_CSV) and result.runs == 12
    summary = json.loads((pool / ev.SUMMARY_JSON).read_text())
    n_pool = summary["pool"]["n_pool"]
    assert n_pool == 301 and summary["test"]["n_test"] == 200
    assert summary["excluded"]["train"] == {ev.EXCLUDED_BAD_LABEL: 1, ev.EXCLUDED_NO_JSON: 1}
    sizes = summary["prototypes"]["cluster_sizes"]
    assert sum(sizes) == n_pool and len(sizes) == 3

    rows = _csv_rows(pool / ev.RESULTS_CSV)
    assert list(rows[0]) == list(ev.RESULT_COLUMNS)
    got = {(r["classifier"], r["policy"], float(r["keep_fraction"]), int(r["seed"])) for r in rows}
    assert got == {(c, p, f, 0) for c in ("linear", "cnn") for p in POLICIES for f in FRACTIONS}
    for r in rows:
        f, n_train = float(r["keep_fraction"]), int(r["n_train"])
        expected = sum(n_keep(f, n) for n in sizes) if r["policy"].startswith("balanced-") else n_keep(f, n_pool)
        assert n_train == expected, r
        assert 0.0 <= float(r["accuracy"]) <= 1.0 and int(r["n_test"]) == 200 and int(r["n_pool"]) == n_pool
        # keep fraction 1.0 keeps the whole pool under every policy: trained once, under the first policy
        assert r["shared_from"] == ("hard@1.0" if f == 1.0 and r["policy"] != "hard" else "")
    for clf in ("linear", "cnn"):
        full = {r["accuracy"] for r in rows if r["classifier"] == clf and r["keep_fraction"] == "1.0"}
        assert len(full) == 1
    assert summary["runs"] == {"rows": 12, "trainings": 8, "reused_from_previous_run": 0, "trained_now": 8, "shared_rows": 4}

    md = (pool / ev.RESULTS_MD).read_text()
    assert result.markdown == str(pool / ev.RESULTS_MD)
    for clf in ("linear", "cnn"):
        assert f"## {clf}" in md
    assert "| policy | 0.5 | 1.0 |" in md
    for clf in ("linear", "cnn"):  # the accuracy table of each classifier lists every policy once
        table = md.split(f"## {clf}")[1].split("Best policy")[0]
        for p in POLICIES + ["n_train"]:
            assert table.count(f"| {p} |") == 1, (clf, p)
    assert "Balanced accuracy minus random's, paired by seed" in md and "## What each subset keeps" in md
    assert f"| n_train | {n_keep(0.5, n_pool)}" in md

    with Image.open(pool / ev.PLOT_PNG) as img:
        assert img.format == "PNG" and img.size[0] > 600 and img.size[1] > 300
        img.verify()
    assert not list(pool.glob(".tmp-*"))


def test_evaluate_rerun_reuses_embeddings_and_finished_runs(tiny_eval):
    from pipelines.cli import evaluate

    pool = tiny_eval["root"] / "out" / ev.pool_dir(None)
    before = (pool / ev.RESULTS_CSV).read_bytes()
    again = evaluate(tiny_eval["cfg"])
    assert again.trained_now == 0 and again.runs == 12
    assert (pool / ev.RESULTS_CSV).read_bytes() == before
    summary = json.loads((pool / ev.SUMMARY_JSON).read_text())
    assert summary["embed"]["train"]["shards_reused"] == 4 and summary["embed"]["train"]["shards_embedded"] == 0

    # a crash after five rows: the re-run trains only what is missing, and gets the same numbers
    lines = before.decode().splitlines(keepends=True)
    kept = lines[:6]
    (pool / ev.RESULTS_CSV).write_text("".join(kept))
    survivors = {(r["classifier"], r["policy"], r["keep_fraction"]) for r in csv.DictReader(io.StringIO("".join(kept)))}
    resumed = evaluate(tiny_eval["cfg"])
    assert 0 < resumed.trained_now < 8 and resumed.runs == 12
    rows = _csv_rows(pool / ev.RESULTS_CSV)
    first = {(r["classifier"], r["policy"], r["keep_fraction"]): r for r in csv.DictReader(io.StringIO(before.decode()))}
    for r in rows:
        key = (r["classifier"], r["policy"], r["keep_fraction"])
        assert r["accuracy"] == first[key]["accuracy"] and r["n_train"] == first[key]["n_train"]  # seeded: same result
        if key in survivors:
            assert r["train_seconds"] == first[key]["train_seconds"]  # reused, not re-trained


def test_evaluate_small_pool_and_a_pool_too_large(tiny_eval):
    from pipelines.cli import evaluate

    root = tiny_eval["root"]
    res = evaluate(_eval_config(root, pool_size=120, classifiers=["linear"]))
    rows = _csv_rows(root / "out" / "pool-120" / ev.RESULTS_CSV)
    assert res.runs == len(rows) == 6 and {r["pool"] for r in rows} == {"120"}
    assert {int(r["n_train"]) for r in rows if r["policy"] == "hard"} == {60, 120}
    with pytest.raises(ConfigError, match="pool_size=5000"):
        evaluate(_eval_config(root, pool_size=5000, classifiers=["linear"]))
