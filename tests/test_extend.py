"""`ssl-prune extend`: new shards curated against a finished run, as one run over both would,
without refitting, re-ranking or re-reading the parent's tars; and what can differ, and why.

A parent on half a web-like pool, an extension with the other half, and one run over the whole
pool with the parent's centroids (its prototypes copied in, so the same clusters) are compared:
- the assignment of the new samples is the same, exactly;
- dedup: the same removals, except (a) where the whole-pool order puts a new sample before its
  near-copy in the parent (`keep: nearest`: the new one is nearer the prototype), so the whole run
  keeps it and removes the old one, which the extension cannot (the parent is never rewritten), and
  (b) where the new sample's only near-copies in the parent are ones the parent removed;
- select: the parent's thresholds, so a new sample's decision differs from the whole run's only
  when its priority lies between the parent's cut and the whole run's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from prune import schema
from prune.select import record

from .conftest import REPO

HALF = "{00000..00001}.tar", "{00002..00003}.tar"
OVERRIDES = ["select.policy=hard", "select.balanced=false", "select.keep_fraction=0.6", "kmeans.k=8",
             "write.samples_per_shard=100"]


def _cfg(input_spec, output, extra=()):
    from pipelines.cli.config import load_config

    return load_config("configs/demo.yaml", [f"input={input_spec}", f"output={output}", *OVERRIDES, *extra])


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    from pipelines.cli import extend, run
    from pipelines.run import run_stages
    from prune.demo.web_like import write_web_like_shards

    root = tmp_path_factory.mktemp("extend")
    write_web_like_shards(str(root / "pool"), count=1200, shard_size=300, seed=3)
    old = os.getcwd()
    os.chdir(REPO)  # the demo config names the shipped encoder by a relative path
    try:
        parent = run(_cfg(f"{root}/pool/{HALF[0]}", root / "parent"))
        child = extend(str(root / "parent"), [f"input={root}/pool/{HALF[1]}", f"output={root / 'child'}"])
        # one run over the whole pool with the parent's centroids: the run's stages, but the
        # prototypes the parent's (what the extension takes too)
        cfg = _cfg(f"{root}/pool/{{00000..00003}}.tar", root / "whole")
        stages = cfg.stage_list()
        stages[[s.name for s in stages].index("prototypes")].parent = str(root / "parent")
        stages[[s.name for s in stages].index("prototypes")].parent_fingerprint = parent["fingerprints"]["prototypes"]
        whole = run_stages(stages, cfg.input, cfg.output, cfg.ray, cfg.model_dump())
    finally:
        os.chdir(old)
    return {"root": root, "parent": parent, "child": child, "whole": whole}


def _table(out, directory):
    return pq.read_table(os.path.join(out, directory)).to_pandas()


def _by_id(df):
    return df.set_index([schema.SHARD, schema.KEY]) if schema.SHARD in df.columns else df


def _scores(out):
    frames = []
    for name in sorted(os.listdir(os.path.join(out, schema.SCORES_DIR))):
        t = pq.read_table(os.path.join(out, schema.SCORES_DIR, name)).to_pandas()
        t[schema.SHARD] = name[: -len(".parquet")]
        frames.append(t)
    import pandas as pd

    return pd.concat(frames).set_index([schema.SHARD, schema.KEY])


def _removals(out):
    import pandas as pd

    d = os.path.join(out, schema.REMOVALS_DIR, "dedup")
    frames = []
    for name in sorted(os.listdir(d)):
        t = pq.read_table(os.path.join(d, name)).to_pandas()
        t[schema.SHARD] = name[: -len(".parquet")]
        frames.append(t)
    return pd.concat(frames).set_index([schema.SHARD, schema.KEY])


def test_the_new_samples_are_assigned_to_the_parents_centroids_exactly(runs):
    child, whole = _scores(runs["root"] / "child"), _scores(runs["root"] / "whole")
    new = whole.loc[child.index]
    assert (child[schema.CLUSTER] == new[schema.CLUSTER]).all()
    assert np.allclose(child[schema.DISTANCE], new[schema.DISTANCE])
    meta = json.loads((runs["root"] / "child" / schema.PROTOTYPES_DIR / schema.KMEANS_META_FILE).read_text())
    assert meta["parent"]["output"] == str(runs["root"] / "parent")
    parent_centroids = np.load(runs["root"] / "parent" / schema.PROTOTYPES_DIR / schema.CENTROIDS_FILE)
    assert np.array_equal(np.load(runs["root"] / "child" / schema.PROTOTYPES_DIR / schema.CENTROIDS_FILE), parent_centroids)


def test_dedup_across_the_boundary_removes_what_the_whole_run_removes_but_for_the_stated_cases(runs):
    root = runs["root"]
    child, whole, parent = _removals(root / "child"), _removals(root / "whole"), _removals(root / "parent")
    new_ids = set(_scores(root / "child").index)
    whole_new = whole[whole.index.isin(new_ids)]
    across = child[child[schema.DUPLICATE_OF_OUTPUT].notna()]
    assert len(across) > 0 and (across[schema.DUPLICATE_OF_OUTPUT] == str(root / "parent")).all()
    parent_removed = set(parent.index)
    for shard, key in zip(across[schema.DUPLICATE_OF_SHARD], across[schema.DUPLICATE_OF]):
        assert (shard, key) not in parent_removed and shard in ("00000", "00001")  # a sample the parent kept
    only_whole = set(whole_new.index) - set(child.index)
    only_child = set(child.index) - set(whole_new.index)
    distance = _scores(root / "whole")[schema.DISTANCE]
    # (a) the extension removed it as a copy of a parent survivor that the whole run's order
    # (keep: nearest) puts after it: there the new one came first and stayed
    for sample in only_child:
        dup = (child.loc[sample, schema.DUPLICATE_OF_SHARD], child.loc[sample, schema.DUPLICATE_OF])
        assert child.loc[sample, schema.DUPLICATE_OF_OUTPUT] == str(root / "parent"), sample
        assert distance[dup] >= distance[sample], (sample, dup)
    # (b) the whole run removed it as a copy of an old sample the parent itself removed
    for sample in only_whole:
        dup = (whole_new.loc[sample, schema.DUPLICATE_OF_SHARD], whole_new.loc[sample, schema.DUPLICATE_OF])
        assert dup in parent_removed, (sample, dup)
    agree = len(set(child.index) & set(whole_new.index))
    assert agree >= 0.8 * max(len(child), len(whole_new))


def test_selection_uses_the_parents_thresholds_and_differs_only_between_the_two_cuts(runs):
    root = runs["root"]
    child, whole = _scores(root / "child"), _scores(root / "whole")
    parent_rec = record.load(__import__("prune.io.storage", fromlist=["OutputDir"]).OutputDir(str(root / "parent")))
    whole_rec = record.load(__import__("prune.io.storage", fromlist=["OutputDir"]).OutputDir(str(root / "whole")))
    c_parent, c_whole = int(parent_rec.cuts.cut[0, -1]), int(whole_rec.cuts.cut[0, -1])
    both_ok = child[(child[schema.STATUS] == schema.STATUS_OK)].index
    both_ok = [i for i in both_ok if whole.loc[i, schema.STATUS] == schema.STATUS_OK]
    lo, hi = min(c_parent, c_whole), max(c_parent, c_whole)
    differ = 0
    for i in both_ok:
        prio = int(child.loc[i, schema.PRIORITY])
        assert prio == int(whole.loc[i, schema.PRIORITY])  # the same priority function
        assert bool(child.loc[i, schema.KEEP]) == (prio >= c_parent)  # the parent's cut, exactly
        if not lo <= prio < hi:
            assert child.loc[i, schema.KEEP] == whole.loc[i, schema.KEEP], i
        else:
            differ += child.loc[i, schema.KEEP] != whole.loc[i, schema.KEEP]
    assert differ <= 0.1 * len(both_ok)
    c = runs["child"]["counts"]
    assert c["input_samples"] == 600 == c["kept"] + c["pruned"] + c["removed"] + c["failed"]
    exported = pq.read_table(root / "child" / schema.EXPORT_IDS_DIR).to_pandas()  # the new kept ids
    assert set(exported[schema.KEY]) == {k for (_, k), keep in child[schema.KEEP].items() if keep}


def test_the_loaders_read_parent_and_new_shards_through_the_combined_sizes(runs):
    import webdataset as wds
    from open_clip_train.data import get_dataset_size

    root = runs["root"]
    sizes = json.loads((root / "child" / "pruned" / "sizes.json").read_text())
    parent_sizes = json.loads((root / "parent" / "pruned" / "sizes.json").read_text())
    mine = sorted(set(sizes) - set(parent_sizes))
    assert set(parent_sizes) <= set(sizes) and min(mine) > max(parent_sizes)  # numbered after the parent's
    pattern = (f"{root}/child/pruned/{{{mine[0][:-4]}..{mine[-1][:-4]}}}.tar::"
               f"{root}/parent/pruned/{{{min(parent_sizes)[:-4]}..{max(parent_sizes)[:-4]}}}.tar")
    total, n = get_dataset_size(pattern)
    kept = runs["parent"]["counts"]["kept"] + runs["child"]["counts"]["kept"]
    assert total == kept == sum(sizes.values()) and n == len(sizes)
    keys = [s["__key__"] for s in wds.WebDataset(pattern, shardshuffle=False)]
    assert len(keys) == kept
    bands = json.loads((root / "child" / "pruned" / "bands.json").read_text())
    assert bands["parent"] == str(root / "parent")
    assert bands["bands"][-1]["cumulative_samples_with_parent"] == kept
    assert all(os.path.exists(p) for b in bands["bands"] for p in b["parent_shards"])


def test_a_copy_of_a_parent_sample_is_removed_and_names_it_and_an_extension_extends(runs, tmp_path, monkeypatch):
    from pipelines.cli import extend

    root = runs["root"]
    new = tmp_path / "copies"
    new.mkdir()
    shutil.copy(root / "pool" / "00000.tar", new / "00009.tar")  # every member byte for byte, another shard name
    monkeypatch.chdir(REPO)
    grand = extend(str(root / "child"), [f"input={new}", f"output={tmp_path / 'grand'}"])
    removed = _removals(tmp_path / "grand")
    statuses = _scores(tmp_path / "grand")[schema.STATUS]
    parent_kept = {i for i, s in _scores(root / "parent")[schema.STATUS].items() if s == schema.STATUS_OK}
    parent_removed = set(_removals(root / "parent").index)
    for key, status in statuses.droplevel(0).items():
        original = ("00000", key)
        if original in parent_kept and original not in parent_removed:  # its original survived in the parent
            r = removed.loc[("00009", key)]
            assert (r[schema.DUPLICATE_OF_OUTPUT], r[schema.DUPLICATE_OF_SHARD], r[schema.DUPLICATE_OF]) == \
                (str(root / "parent"), "00000", key)  # removed, naming its original
        elif status == schema.STATUS_OK:
            assert original in parent_removed  # kept only when the parent had removed its original
    kept_new = int((statuses == schema.STATUS_OK).sum())
    assert grand["parent"]["ancestors"] == [str(root / "child"), str(root / "parent")]
    assert grand["counts"]["removed_by_reason"][schema.STATUS_NEAR_DUPLICATE] >= 300 - kept_new - grand["counts"]["failed"]


def test_a_parent_made_otherwise_is_refused_in_one_line(runs, tmp_path, monkeypatch):
    from pipelines.cli import extend
    from pipelines.parents import ParentMismatch

    root = runs["root"]
    new = f"input={root}/pool/{HALF[1]}"
    monkeypatch.chdir(REPO)
    for extra, words in (([f"output={tmp_path / 'x'}", "embed.pretrained=models/fmnist-clip", "embed.backend=open_clip"],
                          "other embed settings"),
                         ([f"output={tmp_path / 'x'}", "kmeans.k=5"], "other kmeans settings"),
                         ([f"output={root / 'parent'}"], "the parent itself")):
        with pytest.raises(ParentMismatch, match=words) as refused:
            extend(str(root / "parent"), [new, *extra])
        assert "\n" not in str(refused.value)
    with pytest.raises(ParentMismatch, match="not a finished ssl-prune run"):
        extend(str(tmp_path), [new, f"output={tmp_path / 'y'}"])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # refused before writing anything


def _digests(out) -> dict:
    got = {}
    for d in (schema.SCORES_DIR, schema.PRUNED_DIR, os.path.join(schema.REMOVALS_DIR, "dedup")):
        for name in sorted(os.listdir(os.path.join(out, d))):
            with open(os.path.join(out, d, name), "rb") as f:
                got[f"{d}/{name}"] = hashlib.sha256(f.read()).hexdigest()
    return got


def test_an_interrupted_extend_resumes_to_identical_outputs(runs, tmp_path, monkeypatch):
    from pipelines.cli import extend

    root = runs["root"]
    out = tmp_path / "again"
    shutil.copytree(root / "child", out)
    before = _digests(root / "child")
    # what a kill in the write stage leaves: no manifest, a scores file gone, the write begun
    # (its pending mark) with every other shard missing and no sizes or bands yet
    fp = json.loads((out / schema.MANIFEST).read_text())["fingerprints"]["write"]
    os.remove(out / schema.MANIFEST)
    os.remove(out / schema.SCORES_DIR / "00003.parquet")
    pruned = out / schema.PRUNED_DIR
    for name in [n for n in os.listdir(pruned) if n.startswith("_") or n in ("sizes.json", "bands.json")]:
        os.remove(pruned / name)
    (pruned / schema.PENDING_MARKER).write_text(json.dumps({"fingerprint": fp}))
    for name in sorted(n for n in os.listdir(pruned) if n.endswith(".tar"))[::2]:
        os.remove(pruned / name)
    monkeypatch.chdir(REPO)
    extend(str(root / "parent"), [f"input={root}/pool/{HALF[1]}", f"output={out}"])
    strip = lambda d: {k: v for k, v in d.items() if not os.path.basename(k).startswith("_")}  # noqa: E731
    assert strip(_digests(out)) == strip(before)


def test_drift_says_when_the_new_samples_leave_the_parents_prototypes(runs, tmp_path, monkeypatch):
    from pipelines.cli import extend
    from prune.demo.web_like import write_web_like_shards

    same = runs["child"]["stages"]["drift"]["record"]  # the other half of the same pool: no drift
    assert 0.0 < same["share_beyond_parent_p95"] < same["refit_share"] and not same["refit_recommended"]
    assert sum(c["new"] for c in same["clusters"]) <= same["new_samples"]
    report = (runs["root"] / "child" / "report.html").read_text()
    assert "Drift against the parent" in report and "no refit needed" in report
    # mostly off-distribution images (noise, stripes, flat colour): far from every prototype
    write_web_like_shards(str(tmp_path / "junk"), count=300, shard_size=300, seed=9, junk_share=0.9,
                          copy_share=0.0, imbalance=1.0)
    os.rename(tmp_path / "junk" / "00000.tar", tmp_path / "junk" / "00007.tar")
    monkeypatch.chdir(REPO)
    moved = extend(str(runs["root"] / "parent"), [f"input={tmp_path}/junk/00007.tar", f"output={tmp_path / 'out'}"])
    rec = moved["stages"]["drift"]["record"]
    assert rec["refit_recommended"] and rec["share_beyond_parent_p95"] > 0.3 and rec["recommendation"].startswith("refit")


def test_a_parent_selected_before_the_cuts_were_recorded_gets_them_found_again(runs, tmp_path, monkeypatch):
    """A parent whose select kept no `selection/` (an older version): the extension finds the same
    cuts again from the parent's assignment and removals, and selects exactly as with the record."""
    from pipelines.cli import extend

    root = runs["root"]
    old = tmp_path / "old-parent"
    shutil.copytree(root / "parent", old)
    shutil.rmtree(old / schema.SELECTION_DIR)
    monkeypatch.chdir(REPO)
    extend(str(old), [f"input={root}/pool/{HALF[1]}", f"output={tmp_path / 'out'}"])
    got, want = _scores(tmp_path / "out"), _scores(root / "child")
    assert got[schema.KEEP].equals(want[schema.KEEP]) and got[schema.BAND].equals(want[schema.BAND])
    assert not (old / schema.SELECTION_DIR).exists()  # the parent is only read
    meta = json.loads((tmp_path / "out" / schema.SELECTION_DIR / record.SELECTION_FILE).read_text())
    assert meta["found_again_from_the_parents_outputs"]

