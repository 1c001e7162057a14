"""`evaluate` with the pretraining judge (classifier `clip`): caption policies and their
compositions, the subsets' shards, and a tiny grid end to end (open_clip_train on each subset)."""

from __future__ import annotations

import json
import os
import tarfile

import numpy as np
import pytest

from pipelines.cli.config import EvaluateConfig, validate_config
from prune import evaluate as ev
from prune.align.cut import keep_count
from prune.dedup.settings import DedupConfig
from prune.settings import ConfigError

FMNIST_NAMES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


def _selection(n=200, seed=0, copies=0, **kw) -> ev.PoolSelection:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8))
    if copies:  # the last `copies` rows are near-copies of the first ones
        x[n - copies:] = x[:copies] + rng.normal(scale=1e-4, size=(copies, 8))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    cluster = rng.integers(0, 4, n)
    if copies:
        cluster[n - copies:] = cluster[:copies]
    scores = rng.uniform(-0.2, 0.8, n).astype(np.float32)
    scores[:5] = np.nan  # no caption
    return ev.PoolSelection(x, rng.uniform(0.1, 0.6, n), cluster, 4, np.array(["00000"] * (n // 2) + ["00001"] * (n - n // 2), object),
                            np.array([f"{i:09d}" for i in range(n)], object), np.eye(4, 8, dtype=np.float32),
                            rng.integers(0, 3, n), np.array(["original"] * n, object), scores, **kw)


def test_caption_alone_keeps_the_best_agreeing_pairs_and_the_uncaptioned_last():
    sel = _selection()
    s = sel.clip_scores
    for f, idx in zip([0.3, 0.5, 0.98], sel.subsets("caption", [0.3, 0.5, 0.98], seed=0)):
        assert len(idx) == keep_count(f, len(sel))  # as many as the clip_score stage's keep_top_fraction
        rest = np.setdiff1d(np.arange(len(sel)), idx)
        scored = idx[~np.isnan(s[idx])]
        if np.isnan(s[rest]).all():  # every scored pair kept, then some without a caption
            assert len(scored) == len(sel) - 5
        else:
            assert np.isnan(s[idx]).sum() == 0 and s[scored].min() >= np.nanmax(s[rest])


def test_caption_first_then_a_policy_among_the_survivors():
    sel = _selection(caption_share=0.6)
    survivors = ev.caption_stage_survivors(sel.clip_scores, 0.6, 0)
    assert len(survivors) == keep_count(0.6, len(sel) - 5) and not np.isnan(sel.clip_scores[survivors]).any()
    for f, idx in zip([0.2, 0.5, 0.9], sel.subsets("caption+random", [0.2, 0.5, 0.9], seed=3)):
        assert set(idx) <= set(survivors)
        assert len(idx) == min(len(survivors), int(np.floor(f * len(sel) + 0.5)))  # the same size as random's
    # the policy inside is the one ssl-prune run applies to the survivors: hard keeps the farthest
    hard = sel.subsets("caption+hard", [0.3], seed=0)[0]
    left = np.setdiff1d(survivors, hard)
    assert sel.distance[hard].min() >= sel.distance[left].max()


def test_a_policy_first_then_caption_keeps_the_best_agreeing_share_of_its_pick():
    sel = _selection(caption_share=0.5)
    picks = sel.subsets("random", [0.6], seed=2)[0]  # f / caption_share
    idx = sel.subsets("random+caption", [0.3], seed=2)[0]
    assert len(idx) == keep_count(0.3, len(sel)) and set(idx) <= set(picks)
    left = np.setdiff1d(picks, idx)
    assert np.nanmin(sel.clip_scores[idx]) >= np.nanmax(sel.clip_scores[left])


def test_dedup_inside_a_caption_composition_sees_only_the_caption_survivors():
    """Stages compose left to right: with caption agreement first, a copy whose original caption
    agreement removed has no original left, so dedup keeps it."""
    sel = _selection(n=120, copies=20, caption_share=0.75, dedup=DedupConfig(eps=0.01))
    sel.clip_scores[:20] = -0.9  # the originals' captions disagree: caption agreement drops them
    sel.clip_scores[100:] = 0.9  # their copies' captions agree
    alone = sel.removed()
    assert alone.sum() == 20  # on the whole pool, one of each pair goes
    idx = sel.subsets("caption+dedup+random", [0.75], seed=0)[0]
    survivors = ev.caption_stage_survivors(sel.clip_scores, 0.75, 0)
    assert not set(range(20)) & set(survivors) and set(range(100, 120)) <= set(idx)
    reverse = sel.subsets("dedup+random+caption", [0.5], seed=0)[0]
    assert not (alone[reverse]).any()


def test_caption_policies_need_scores_and_configs_name_the_key():
    sel = _selection()
    sel.clip_scores = None
    with pytest.raises(ValueError, match="embed.text"):
        sel.subsets("caption", [0.5], 0)
    base = {"train_input": "a", "test_input": "b", "output": "c"}
    with pytest.raises(ConfigError, match="evaluate.class_names"):
        validate_config(base | {"evaluate": {"classifiers": ["clip"]}}, EvaluateConfig)
    with pytest.raises(ConfigError, match="evaluate.policies"):
        validate_config(base | {"evaluate": {"policies": ["caption+nonsense"]}}, EvaluateConfig)
    cfg = validate_config(base | {"evaluate": {"classifiers": ["clip"], "class_names": FMNIST_NAMES,
                                               "policies": ["caption", "caption+dedup+dbp-hard", "dedup+dbp-hard+caption"]}},
                          EvaluateConfig)
    assert cfg.evaluate.policies[1] == "caption+dedup+dbp-hard"


def test_subset_shards_copy_every_member_byte_for_byte(tmp_path):
    import webdataset as wds

    from prune.demo.shards import write_demo_shards
    from prune.evaluate.subset_shards import write_subset_shards

    tars = write_demo_shards(str(tmp_path / "pool"), count=60, shard_size=30)
    sources = {os.path.basename(t)[:-4]: t for t in tars}
    kept = {"00000": ["000000003", "000000010", "000000029"], "00001": ["000010000"], "00002": []}
    out = tmp_path / "subset"
    sizes = write_subset_shards(sources, kept, str(out))
    assert sizes == {"00000.tar": 3, "00001.tar": 1}
    assert json.loads((out / "sizes.json").read_text()) == sizes
    for name, shard in (("00000.tar", "00000"), ("00001.tar", "00001")):
        with tarfile.open(out / name) as got, tarfile.open(sources[shard]) as src:
            members = {m.name: got.extractfile(m).read() for m in got if m.isfile()}
            assert {n.split(".")[0] for n in members} == set(kept[shard])
            for n, data in members.items():
                assert src.extractfile(n).read() == data
    keys = [s["__key__"] for s in wds.WebDataset(str(out / "{00000..00001}.tar"), shardshuffle=False)]
    assert keys == kept["00000"] + kept["00001"]
    mtime = os.path.getmtime(out / "00000.tar")
    assert write_subset_shards(sources, kept, str(out)) == sizes and os.path.getmtime(out / "00000.tar") == mtime


# --- end to end: open_clip_train on each subset of a tiny grid -------------------------------------

@pytest.fixture(scope="module")
def clip_eval(ray_cluster, tmp_path_factory):
    from pipelines.cli import evaluate
    from prune.demo.shards import write_demo_shards
    from prune.demo.web_like import write_web_like_shards

    root = tmp_path_factory.mktemp("clip-eval")
    write_web_like_shards(str(root / "train"), count=400, shard_size=200, seed=5)
    write_demo_shards(str(root / "test"), split="test", count=200, shard_size=100, captions="describe")
    cfg = validate_config({
        "train_input": str(root / "train"), "test_input": str(root / "test"), "output": str(root / "out"),
        "decode": {"batch_size": 100},
        "embed": {"backend": "open_clip", "pretrained": os.path.join(os.path.dirname(__file__), "..", "models", "fmnist-clip"),
                  "text": True, "precision": "fp32", "batch_size": 100, "torch_threads": 1},
        "kmeans": {"k": 4, "niter": 5},
        "evaluate": {"keep_fractions": [0.5], "policies": ["random", "caption", "caption+dedup+random"], "seeds": [0],
                     "classifiers": ["clip"], "class_names": FMNIST_NAMES, "caption_share": 0.8,
                     "clip": {"samples_seen": 100, "batch_size": 50, "epochs": 1, "n_pairs": 50, "width": 32,
                              "layers": 1, "embed_dim": 32}},
    }, EvaluateConfig)
    return {"root": root, "cfg": cfg, "result": evaluate(cfg)}


def test_the_judge_trains_on_each_subsets_shards_and_scores_zero_shot_and_retrieval(clip_eval):
    rows = ev.read_results_csv(open(clip_eval["result"].csv, "rb").read())
    assert [r[ev.POLICY] for r in rows] == ["random", "caption", "caption+dedup+random"]
    subsets = os.path.join(clip_eval["root"], "out", "pool-all", ev.SUBSETS_DIR)
    for r in rows:
        # half the pool; caption+dedup+random: all that caption agreement and dedup left, when fewer
        assert r[ev.CLASSIFIER] == "clip" and r[ev.N_TEST] == 200 and r[ev.STEPS] == 2
        assert r[ev.N_TRAIN] == 200 or (r[ev.POLICY] == "caption+dedup+random" and r[ev.N_TRAIN] < 200)
        assert 0 <= r[ev.ACCURACY] <= 1 and 0 <= r[ev.RECALL_1] <= r[ev.RECALL_5] <= 1
    caption, rand = rows[1], rows[0]
    assert caption[ev.MISCAPTIONED_KEPT] < rand[ev.MISCAPTIONED_KEPT]  # the shipped CLIP tells them apart
    judged = [json.load(open(os.path.join(subsets, d, "seed-0", "logs", "run", "judge.json"))) for d in os.listdir(subsets)]
    assert len(judged) == 3
    for j in judged:
        assert j["train"]["samples_seen"] == 100 and j["train"]["subset_samples"] <= 200
        assert j["metrics"]["n_pairs"] == 50 and not os.path.exists(j["shards"])  # scored, then its shards deleted
    md = open(clip_eval["result"].markdown).read()
    assert "open_clip_train" in md and "recall@5" in md and "minus caption's" in md


def test_the_judge_grid_resumes_from_its_results(clip_eval):
    from pipelines.cli import evaluate

    again = evaluate(clip_eval["cfg"])
    assert again.trained_now == 0 and again.runs == 3
    with pytest.raises(ConfigError, match="class_names"):
        evaluate(clip_eval["cfg"].model_copy(update={"evaluate": clip_eval["cfg"].evaluate.model_copy(
            update={"class_names": FMNIST_NAMES[:3], "caption_share": 0.5})}))


def test_the_caption_oracle_keeps_originals_whose_caption_describes_them_classes_even():
    kinds = np.array(["describes", "wrong", "noise", "describes", None] * 40, dtype=object)
    sel = _selection(caption_kinds=kinds)
    sel.kinds[::7] = "copy"
    for f, idx in zip([0.1, 0.3], sel.subsets("caption-oracle", [0.1, 0.3], seed=1)):
        assert (kinds[idx] == "describes").all() and (sel.kinds[idx] == "original").all()
        assert len(idx) == min(int(np.floor(f * 200 + 0.5)), int(((kinds == "describes") & (sel.kinds == "original")).sum()))
        if f == 0.1:  # 20 of ~75 usable: every class has enough, so they are capped evenly
            counts = np.bincount(sel.labels[idx], minlength=3)
            assert counts.max() - counts.min() <= 1
    with pytest.raises(ValueError, match="caption kind"):
        _selection().subsets("caption-oracle", [0.3], 0)
