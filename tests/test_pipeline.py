"""End-to-end behaviour of `ssl-prune run` on real shards, real Ray, real faiss."""

from __future__ import annotations

import glob
import json
import os
import shutil
from collections import Counter

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray
import webdataset as wds

from pipelines.cli.config import validate_config
from prune import schema
from prune.io.shards import read_shard, split_member_name
from prune.io.storage import OutputDir
from prune.io.tar_index_cache import load_index
from prune.io.tar_spans import tar_index

from .conftest import embed_actors, pruned_tars, read_scores, small_config, tar_members


def _expected_samples(shards_dir) -> dict[str, list]:
    """shard -> samples as our reader sees them (statuses checked against the fixtures below)."""
    exts = list(schema.IMAGE_EXTENSIONS_DEFAULT)
    return {
        schema.shard_id_of(p): read_shard(p, exts).samples
        for p in sorted(glob.glob(f"{shards_dir['dir']}/*.tar"))
    }


def test_accounting_identity_and_failure_reasons(pipeline_run, shards_dir):
    counts = pipeline_run["manifest"]["counts"]
    expected = _expected_samples(shards_dir)
    assert counts["input_samples"] == sum(len(v) for v in expected.values())
    assert counts["input_samples"] == counts["kept"] + counts["pruned"] + counts["failed"]
    bad = shards_dir["bad"]
    want_failed = Counter(s for s in bad["mixed"]["expected"].values() if s != schema.STATUS_OK)
    want_failed.update(s for s in bad["truncated"]["expected"].values() if s != schema.STATUS_OK)
    want_failed[schema.STATUS_BAD_NAME] += 1
    assert counts["failed_by_reason"] == dict(want_failed)
    failures = counts["shard_failures"]
    assert failures.keys() == {bad["not_a_tar"]["shard"], bad["empty"]["shard"]}
    assert failures[bad["not_a_tar"]["shard"]].startswith(schema.SHARD_NOT_A_TAR)
    assert failures[bad["empty"]["shard"]].startswith(schema.SHARD_EMPTY)
    assert os.path.exists(f"{pipeline_run['out']}/manifest.json")


def test_scores_one_row_per_sample_with_reasons(pipeline_run, shards_dir):
    out = pipeline_run["out"]
    scores = read_scores(out).to_pylist()
    by_id = {(r[schema.SHARD], r[schema.KEY]): r for r in scores}
    assert len(by_id) == len(scores)
    for shard, samples in _expected_samples(shards_dir).items():
        assert [r[schema.KEY] for r in scores if r[schema.SHARD] == shard] == [s.key for s in samples]
    mixed = shards_dir["bad"]["mixed"]
    for key, status in mixed["expected"].items():
        assert by_id[(mixed["shard"], key)][schema.STATUS] == status
    for r in scores:
        if r[schema.STATUS] == schema.STATUS_OK:
            assert 0.0 <= r[schema.DISTANCE] <= 2.0 and r[schema.CLUSTER] >= 0
        else:
            assert not r[schema.KEEP] and r[schema.DISTANCE] is None and r[schema.CLUSTER] == -1


def test_distance_is_one_minus_cosine_to_nearest_prototype(pipeline_run):
    out = pipeline_run["out"]
    centroids = np.load(f"{out}/prototypes/centroids.npy")
    meta = json.load(open(f"{out}/prototypes/kmeans.json"))
    assert centroids.shape == (meta["k"], meta["dim"])
    for path in sorted(glob.glob(f"{out}/embeddings/*.parquet")):
        emb = pq.read_table(path)
        sc = pq.read_table(f"{out}/scores/{os.path.basename(path)}")
        ok = [s == schema.STATUS_OK for s in emb.column(schema.STATUS).to_pylist()]
        if not any(ok):
            continue
        x = np.array([v for v, good in zip(emb.column(schema.EMBEDDING).to_pylist(), ok) if good], np.float32)
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=2e-3)
        sims = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ centroids.T
        dist = np.array([d for d, good in zip(sc.column(schema.DISTANCE).to_pylist(), ok) if good])
        clus = np.array([c for c, good in zip(sc.column(schema.CLUSTER).to_pylist(), ok) if good])
        np.testing.assert_allclose(dist, 1.0 - sims.max(axis=1), atol=1e-4)
        assert (clus == sims.argmax(axis=1)).mean() > 0.98  # float16 storage may flip near-ties


def test_pruned_members_are_byte_identical_and_adjacent(pipeline_run, shards_dir):
    out = pipeline_run["out"]
    source, n_members = {}, {}  # every member of every input sample, as our reader streams it
    for shard, samples in _expected_samples(shards_dir).items():
        for s in samples:
            source |= {(shard, info.name): data for info, data in s.members}
            n_members[(shard, s.key)] = len(s.members)
    kept = {(r[schema.SHARD], r[schema.KEY]) for r in read_scores(out).to_pylist() if r[schema.KEEP]}
    seen, compared = set(), 0
    for tar_path in pruned_tars(out):
        meta = pq.read_table(tar_path[:-4] + ".parquet").to_pylist()
        keys_in_order = []
        for name, data in tar_members(tar_path):
            key = split_member_name(name)[0]
            if not keys_in_order or keys_in_order[-1] != key:
                keys_in_order.append(key)
            row = meta[len(keys_in_order) - 1]
            assert row[schema.KEY] == key
            assert source[(row[schema.SOURCE_SHARD], name)] == data, f"{name} differs from its input bytes"
            compared += 1
            assert not name.startswith("/") and ".." not in name.split("/")
        assert len(keys_in_order) == len(set(keys_in_order)) == len(meta)  # members adjacent
        seen |= {(r[schema.SOURCE_SHARD], r[schema.KEY]) for r in meta}
    assert seen == kept
    assert compared == sum(n_members[k] for k in kept)  # every member of every kept sample
    truncated = shards_dir["bad"]["truncated"]["shard"]
    assert any(s == truncated for s, _ in kept)  # the complete samples of a cut-short tar survive


def test_the_embed_reads_record_each_readable_tars_index(pipeline_run, shards_dir):
    """The embed stage's read tasks leave every readable tar's index (the write stage's shortcut),
    stamped with that tar and equal to a walk over its headers; an unreadable tar has none."""
    out = OutputDir(str(pipeline_run["out"]))
    paths = sorted(glob.glob(f"{shards_dir['dir']}/*.tar"))
    recorded = 0
    for path in paths:
        index = load_index(out, schema.shard_id_of(path), path)
        if read_shard(path, list(schema.IMAGE_EXTENSIONS_DEFAULT)).shard_error:
            assert index is None
            continue
        with open(path, "rb") as f:
            assert index is not None and index.samples() == tar_index(f).samples()
        recorded += 1
    assert 0 < recorded < len(paths)  # the fixtures hold tars that cannot be read


def test_pruned_shards_read_by_webdataset_and_ray(pipeline_run):
    out = pipeline_run["out"]
    sizes = json.load(open(f"{out}/pruned/sizes.json"))
    tars = pruned_tars(out)
    assert sorted(sizes) == [os.path.basename(t) for t in tars]
    total = sum(sizes.values())
    assert total == pipeline_run["manifest"]["counts"]["kept"]
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "txt"))
    assert len(samples) == total
    assert all(img.size == (28, 28) and txt.startswith("a") for _, img, txt in samples)
    for t in tars:
        stats = json.load(open(t[:-4] + schema.STATS_SUFFIX))
        assert stats["count"] == sizes[os.path.basename(t)] == pq.read_metadata(t[:-4] + ".parquet").num_rows
    ds = ray.data.read_webdataset(f"{out}/pruned", file_extensions=["tar"])
    assert ds.count() == total


def test_band_prefixes_are_smaller_selections(pipeline_run):
    out = pipeline_run["out"]
    bands = json.load(open(f"{out}/pruned/bands.json"))["bands"]
    scores = [r for r in read_scores(out).to_pylist() if r[schema.STATUS] == schema.STATUS_OK]
    per_cluster = Counter(r[schema.CLUSTER] for r in scores)
    shards_so_far = []
    for b in bands:
        shards_so_far += b["shards"]
        keys = set()
        for name in shards_so_far:
            keys |= {(r[schema.SOURCE_SHARD], r[schema.KEY]) for r in pq.read_table(f"{out}/pruned/{name[:-4]}.parquet").to_pylist()}
        want = {(r[schema.SHARD], r[schema.KEY]) for r in scores if 0 <= r[schema.BAND] <= b["band"]}
        assert keys == want
        # balanced: every cluster keeps round(edge * size) at this prefix
        kept_by_cluster = Counter(r[schema.CLUSTER] for r in scores if 0 <= r[schema.BAND] <= b["band"])
        for c, n in per_cluster.items():
            assert kept_by_cluster[c] == int(np.floor(b["keep_fraction"] * n + 0.5))
    assert bands[-1]["keep_fraction"] == pipeline_run["cfg"].select.keep_fraction


def test_nothing_is_written_outside_the_output_directory(ray_cluster, shards_dir, tmp_path):
    """A run leaves the input directory and the working directory exactly as they were."""
    from pipelines.cli import run

    def snapshot(d):
        return {p: os.stat(p).st_mtime_ns for p in glob.glob(f"{d}/**", recursive=True)}

    before_in, before_cwd = snapshot(shards_dir["dir"]), snapshot(os.getcwd())
    out = tmp_path / "out"
    run(validate_config(small_config(shards_dir["dir"], out, **{"select.keep_fraction": 0.5})))
    assert snapshot(shards_dir["dir"]) == before_in
    assert snapshot(os.getcwd()) == before_cwd
    assert not os.path.exists("/abs/evil.jpg")
    assert not glob.glob(f"{out}/{schema.STAGING_DIR}")  # scratch removed when done
    names = [m for t in pruned_tars(out) for m, _ in tar_members(t)]
    assert names and not any("escape" in n or "evil" in n for n in names)


def test_rerun_resumes_everything_and_changes_nothing(pipeline_run, run_copy):
    from pipelines.cli import run

    cfg = validate_config(small_config(pipeline_run["cfg"].input, run_copy))
    manifest = run(cfg)
    st = manifest["stages"]
    assert st["embed"]["shards_reused"] == st["embed"]["shards_total"] and st["embed"]["shards_embedded"] == 0
    assert st["prototypes"]["reused"] and st["assign"]["shards_assigned"] == 0 and st["write"]["reused"]
    assert manifest["counts"] == pipeline_run["manifest"]["counts"]
    assert read_scores(run_copy).equals(read_scores(pipeline_run["out"]))


def test_where_the_writer_reads_bytes_from_changes_no_output(pipeline_run, run_copy):
    """write.copy_from is placement only: staged fragment tars give the very bytes input ranges gave."""
    from pipelines.cli import run

    cfg = validate_config(small_config(pipeline_run["cfg"].input, run_copy, **{"write.copy_from": "staged"}))
    assert run(cfg)["stages"]["write"]["reused"]  # same fingerprint: nothing to write again
    for tar in pruned_tars(run_copy):
        os.remove(tar)
    os.remove(f"{run_copy}/pruned/{schema.STAGE_MARKER}")
    manifest = run(cfg)
    assert not manifest["stages"]["write"]["reused"]
    for a, b in zip(pruned_tars(run_copy), pruned_tars(pipeline_run["out"]), strict=True):
        assert open(a, "rb").read() == open(b, "rb").read()


def test_resume_after_a_partial_run_gives_the_same_result(pipeline_run, run_copy):
    """Simulate a crash: manifest gone, some stage outputs missing, write stage half done."""
    from pipelines.cli import run

    os.remove(f"{run_copy}/manifest.json")
    os.remove(sorted(glob.glob(f"{run_copy}/embeddings/*.parquet"))[1])
    os.remove(sorted(glob.glob(f"{run_copy}/scores/*.parquet"))[2])
    os.rename(f"{run_copy}/pruned/{schema.STAGE_MARKER}", f"{run_copy}/pruned/{schema.PENDING_MARKER}")
    kept_tar = pruned_tars(run_copy)[0]
    kept_mtime = os.stat(kept_tar).st_mtime_ns
    os.remove(pruned_tars(run_copy)[-1])
    cfg = validate_config(small_config(pipeline_run["cfg"].input, run_copy))
    manifest = run(cfg)
    assert manifest["stages"]["embed"]["shards_embedded"] == 1
    assert manifest["counts"] == pipeline_run["manifest"]["counts"]
    assert read_scores(run_copy).equals(read_scores(pipeline_run["out"]))
    for a, b in zip(pruned_tars(run_copy), pruned_tars(pipeline_run["out"]), strict=True):
        assert tar_members(a) == tar_members(b)
    assert os.stat(kept_tar).st_mtime_ns == kept_mtime  # finished shards were not rewritten
    assert not os.path.exists(f"{run_copy}/pruned/{schema.PENDING_MARKER}")


def test_new_selection_reuses_embeddings_and_prototypes(pipeline_run, run_copy):
    from pipelines.cli import run

    base = pipeline_run["cfg"].input
    easy = run(validate_config(small_config(base, run_copy, **{"select.policy": "easy", "select.balanced": False, "select.keep_fraction": 0.3})))
    st = easy["stages"]
    assert st["embed"]["shards_embedded"] == 0 and st["prototypes"]["reused"] and st["assign"]["shards_assigned"] == 0
    n_ok = easy["counts"]["kept"] + easy["counts"]["pruned"]
    assert easy["counts"]["kept"] == int(np.floor(0.3 * n_ok + 0.5))
    easy_kept = [r[schema.DISTANCE] for r in read_scores(run_copy).to_pylist() if r[schema.KEEP]]
    easy_pruned = [r[schema.DISTANCE] for r in read_scores(run_copy).to_pylist() if r[schema.STATUS] == "ok" and not r[schema.KEEP]]
    assert max(easy_kept) <= min(easy_pruned)
    hard = run(validate_config(small_config(base, run_copy, **{"select.policy": "hard", "select.balanced": False, "select.keep_fraction": 0.3})))
    hard_kept = [r[schema.DISTANCE] for r in read_scores(run_copy).to_pylist() if r[schema.KEEP]]
    assert hard["counts"]["kept"] == easy["counts"]["kept"]
    assert min(hard_kept) >= max(easy_kept)  # global 30% from each end of the distance order
    assert len(pruned_tars(run_copy)) == hard["counts"]["output_shards"]


def test_same_shard_names_from_another_input_are_not_reused(pipeline_run, run_copy, shards_dir, tmp_path):
    """Embeddings are tied to the input file they came from, not just its shard name."""
    from pipelines.cli import run
    from prune.demo.shards import write_demo_shards

    other = tmp_path / "other"
    write_demo_shards(str(other), count=2 * 60, shard_size=60, seed=7, start=1000)
    manifest = run(validate_config(small_config(other, run_copy)))
    st = manifest["stages"]
    assert st["embed"]["shards_embedded"] == 2 and not st["prototypes"]["reused"]
    assert manifest["counts"]["input_samples"] == 120
    assert manifest["bands"][-1]["cumulative_samples"] == manifest["counts"]["kept"]


def test_timm_backend_runs_the_whole_pipeline(pipeline_run, run_copy):
    """Switching backend re-embeds (new fingerprint) and everything downstream follows."""
    from pipelines.cli import run

    base = pipeline_run["cfg"].input
    actors_before = set(embed_actors())
    manifest = run(validate_config(small_config(base, run_copy, **{
        "embed.backend": "timm", "embed.model": "vit_tiny_patch16_224", "embed.batch_size": 16})))
    st = manifest["stages"]
    assert st["embed"]["shards_embedded"] == st["embed"]["shards_total"] and not st["prototypes"]["reused"]
    # every shard went through one actor pool: the model was loaded once (embed.concurrency = 1)
    assert st["embed"]["shards_total"] > 1 and len(set(embed_actors()) - actors_before) == 1
    assert manifest["model_id"] == "timm:vit_tiny_patch16_224:random-init-seed0"
    assert manifest["counts"]["input_samples"] == pipeline_run["manifest"]["counts"]["input_samples"]
    dim = pq.read_schema(sorted(glob.glob(f"{run_copy}/embeddings/*.parquet"))[0]).field(schema.EMBEDDING).type.list_size
    assert dim == 192  # vit_tiny's width, not ViT-S-32's


def test_embed_actors_ask_for_a_gpu_when_the_cluster_has_one(pipeline_run):
    # the session's Ray has one fake GPU: the run completing proves the actor was placed on it
    assert pipeline_run["manifest"]["stages"]["embed"]["actor_resources"]["num_gpus"] == 1
    assert pipeline_run["manifest"]["random_init"] is True


@pytest.mark.parametrize("select", [
    {"select.policy": "hard", "select.balanced": True, "select.budget": "capped_equal"},
    {"select.policy": "random", "select.balanced": True, "select.budget": "dbp", "select.dbp_temperature": 0.05},
    {"select.policy": "stratified", "select.balanced": True, "select.budget": "capped_equal", "select.strata": 5},
    {"select.policy": "stratified", "select.balanced": False, "select.drop_hardest": 0.1},
], ids=["capped-hard", "dbp-random", "capped-stratified", "stratified"])
def test_bands_hold_for_every_budget_and_order(pipeline_run, run_copy, tmp_path, select):
    """A prefix of pruned/ ending at a band is exactly what a run at that smaller fraction keeps,
    and every cluster keeps what the budget allots it there."""
    from pipelines.cli import run
    from prune.select.budgets import BUDGETS, ClusterStats
    from prune.select.settings import SelectConfig

    base = pipeline_run["cfg"].input
    over = select | {"select.keep_fraction": 0.6, "write.band_step": 0.2}
    manifest = run(validate_config(small_config(base, run_copy, **over)))
    bands = manifest["bands"]
    scores = [r for r in read_scores(run_copy).to_pylist() if r[schema.STATUS] == schema.STATUS_OK]
    sizes = np.bincount([r[schema.CLUSTER] for r in scores], minlength=4)
    cfg = SelectConfig(**{k.split(".", 1)[1]: v for k, v in over.items() if k.startswith("select.")})
    edges = [b["keep_fraction"] for b in bands]
    if cfg.balanced:
        centroids = np.load(run_copy / "prototypes" / "centroids.npy")
        sums = np.bincount([r[schema.CLUSTER] for r in scores], weights=[r[schema.DISTANCE] for r in scores], minlength=4)
        allotted = cfg.make_budget().allocate(sizes, edges, ClusterStats(sizes, sums, centroids), 0)
    shards_so_far = []
    for b in bands:
        shards_so_far += b["shards"]
        keys = {(r[schema.SOURCE_SHARD], r[schema.KEY]) for name in shards_so_far
                for r in pq.read_table(f"{run_copy}/pruned/{name[:-4]}.parquet").to_pylist()}
        assert keys == {(r[schema.SHARD], r[schema.KEY]) for r in scores if 0 <= r[schema.BAND] <= b["band"]}
        kept = np.bincount([r[schema.CLUSTER] for r in scores if 0 <= r[schema.BAND] <= b["band"]], minlength=4)
        if cfg.balanced:
            np.testing.assert_array_equal(kept, allotted[:, b["band"]])
        else:
            assert kept.sum() == int(np.floor(b["keep_fraction"] * sizes.sum() + 0.5))
    # the first band is the selection a run at that fraction makes
    smaller = tmp_path / "smaller"
    shutil.copytree(run_copy, smaller)
    run(validate_config(small_config(base, smaller, **(over | {"select.keep_fraction": edges[0]}))))
    kept_small = {(r[schema.SHARD], r[schema.KEY]) for r in read_scores(smaller).to_pylist() if r[schema.KEEP]}
    assert kept_small == {(r[schema.SHARD], r[schema.KEY]) for r in scores if r[schema.BAND] == 0}
    assert BUDGETS.check(cfg.budget)


def test_scores_only_run_copies_no_tar_and_flags_the_old_shards(pipeline_run, run_copy):
    """Without the write stage (what a DataComp user needs: ids, not 27 TB of tars) a new selection
    lands in scores/ only; the pruned shards of the earlier run stay, named stale in the manifest."""
    from pipelines.cli import run

    before = {p.name: p.stat().st_mtime_ns for p in (run_copy / "pruned").iterdir()}
    cfg = validate_config(small_config(pipeline_run["cfg"].input, run_copy, **{
        "stages": ["embed", "prototypes", "assign", "select"], "select.keep_fraction": 0.3}))
    manifest = run(cfg)
    assert "write" not in manifest["stages"] and manifest["stages"]["embed"]["reused"]
    assert "pruned" in manifest["stale_outputs"] and "bands" not in manifest
    c = manifest["counts"]
    assert "output_shards" not in c and c["kept"] == int(pc.sum(read_scores(run_copy).column(schema.KEEP)).as_py())
    ok = c["kept"] + c["pruned"]
    assert c["kept"] < pipeline_run["manifest"]["counts"]["kept"] and abs(c["kept"] - 0.3 * ok) <= 4 / 2 + 1
    assert {p.name: p.stat().st_mtime_ns for p in (run_copy / "pruned").iterdir()} == before
