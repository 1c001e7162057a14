"""SemDeDup: the blocked in-cluster rule against a brute-force pairwise reference, the stage end to
end on shards with planted copies (one node and three), the accounting, and undoing it."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from pipelines.cli import run
from pipelines.cli.config import validate_config
from prune import schema
from prune.dedup.semdedup import dedup_cluster, dedup_ordered, keep_order
from prune.dedup.settings import DedupConfig
from prune.demo.shards import write_demo_shards

from .conftest import REPO, small_config

# --- the rule, in memory ---------------------------------------------------------------------


def brute_force(x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """The paper's formulation: column maxima of the strict upper triangle of the full matrix."""
    x = x.astype(np.float64)
    sim = np.triu(x @ x.T, k=1)
    sim[np.tril_indices(len(x))] = -np.inf
    best = sim.max(axis=0) if len(x) else np.zeros(0)
    removed = best > 1 - eps
    return removed, np.where(removed, sim.argmax(axis=0), -1)


def clustered(n=300, d=16, copies=60, seed=0, spread=0.02):
    """Unit vectors with `copies` planted near-copies (small perturbations) of earlier rows."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    src = rng.choice(n - copies, copies)
    x[n - copies:] = x[src] + rng.normal(scale=spread, size=(copies, d)) * np.linalg.norm(x[src], axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    perm = rng.permutation(n)
    return x[perm].astype(np.float32)


@pytest.mark.parametrize("block_rows", [1, 7, 64, 10_000])
@pytest.mark.parametrize("eps", [0.001, 0.01, 0.2])
def test_blocked_rule_equals_the_full_matrix(block_rows, eps):
    x = clustered(seed=int(eps * 1000) + block_rows)
    got = dedup_ordered(x, eps, block_rows)
    want_removed, want_dup = brute_force(x, eps)
    np.testing.assert_array_equal(got.removed, want_removed)
    np.testing.assert_array_equal(got.duplicate_of, want_dup)
    assert (got.duplicate_of[got.removed] < np.nonzero(got.removed)[0]).all()  # always an earlier member
    sims = (x[got.removed] * x[got.duplicate_of[got.removed]]).sum(axis=1)
    np.testing.assert_allclose(got.similarity[got.removed], sims, atol=1e-5)
    assert got.removed.sum() > 0 or eps == 0.001


def test_exact_copies_leave_one_survivor_per_group_the_farthest():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(5, 8))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    x = np.repeat(base, 4, axis=0).astype(np.float32)  # 5 groups of 4 identical members
    distance = rng.uniform(0.1, 0.9, len(x))
    keys = [f"k{i:03d}" for i in range(len(x))]
    shards = ["00000"] * len(x)
    for keep, pick in (("farthest", np.argmax), ("nearest", np.argmin)):
        res = dedup_cluster(x, distance, shards, keys, 0.01, keep, seed=0)
        for g in range(5):
            members = np.arange(4 * g, 4 * g + 4)
            survivor = members[pick(distance[members])]
            assert list(members[~res.removed[members]]) == [survivor], keep
            assert (res.duplicate_of[members[res.removed[members]]] >= 0).all()
    a = dedup_cluster(x, distance, shards, keys, 0.01, "random", seed=1).removed
    assert a.sum() == 15 and (a == dedup_cluster(x, distance, shards, keys, 0.01, "random", seed=1).removed).all()
    assert any((dedup_cluster(x, distance, shards, keys, 0.01, "random", seed=s).removed != a).any() for s in range(2, 8))


def test_keep_order_breaks_ties_by_identity_not_by_input_order():
    d = np.array([0.5, 0.5, 0.5, 0.2])
    keys, shards = ["a", "b", "c", "d"], ["s"] * 4
    o1 = keep_order(d, shards, keys, "farthest", 0)
    o2 = keep_order(d[::-1], shards[::-1], keys[::-1], "farthest", 0)
    assert [keys[i] for i in o1] == [keys[::-1][i] for i in o2] and keys[o1[-1]] == "d"


# --- the stage, end to end ---------------------------------------------------------------------

LOCAL_ENCODER = os.path.join(REPO, "models", "fmnist-simclr")
N_COPIES = 15


@pytest.fixture(scope="module")
def copies_dir(tmp_path_factory):
    """Two demo shards and a third holding exact copies (new keys) of 15 images of the first."""
    d = tmp_path_factory.mktemp("dedup") / "shards"
    paths = write_demo_shards(str(d), count=120, shard_size=60, seed=5)
    with tarfile.open(paths[0]) as src:
        jpgs = [(m.name[:-4], src.extractfile(m).read()) for m in src.getmembers() if m.name.endswith(".jpg")]
    originals = jpgs[:N_COPIES]
    with tarfile.open(d / "00002.tar", "w") as tar:
        for i, (_, data) in enumerate(originals):
            info = tarfile.TarInfo(f"00002{i:04d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return {"dir": d, "pairs": {f"00002{i:04d}": key for i, (key, _) in enumerate(originals)}}


def _config(shards, out, stages=("embed", "prototypes", "assign", "dedup", "select", "write"), **over):
    return validate_config(small_config(shards, out, **({
        "stages": list(stages), "embed.backend": "local", "embed.pretrained": LOCAL_ENCODER,
        "embed.allow_random_init": False, "kmeans.k": 3, "dedup.eps": 0.002, "dedup.bucket_rows": 70,
        "dedup.shards_per_task": 2, "dedup.block_rows": 16, "select.keep_fraction": 0.5,
    } | over)))


def _removed(out, stage="dedup", column=schema.DUPLICATE_OF) -> dict[str, str]:
    """key -> `column` of every sample a curation stage removed (its own files, removals/<stage>/)."""
    rows = pa.concat_tables(pq.read_table(p) for p in sorted((out / "removals" / stage).glob("*.parquet"))).to_pylist()
    return {r[schema.KEY]: r[column] for r in rows}


def _owned_files(out) -> dict:
    """The bytes of every file the stages before dedup wrote (assign/, embeddings/, prototypes/)."""
    return {p: p.read_bytes() for d in ("assign", "embeddings", "prototypes") for p in sorted((out / d).glob("*"))}


def _reference(out, eps: float) -> set[str]:
    """The rule applied per cluster to the embeddings files directly: the full matrix, the keep order."""
    emb = pa.concat_tables(pq.read_table(p) for p in sorted((out / "embeddings").glob("*.parquet")))
    scores = pa.concat_tables(pq.read_table(p, columns=[schema.KEY, schema.SHARD, schema.CLUSTER, schema.DISTANCE])
                              for p in sorted((out / "scores").glob("*.parquet")))
    ok = emb.column(schema.STATUS).to_numpy(zero_copy_only=False) == "ok"
    x = np.stack([np.asarray(v, np.float32) for v in emb.column(schema.EMBEDDING).to_pylist() if v is not None])
    keys = scores.column(schema.KEY).to_numpy(zero_copy_only=False)[ok]
    shards = scores.column(schema.SHARD).to_numpy(zero_copy_only=False)[ok]
    cluster = scores.column(schema.CLUSTER).to_numpy()[ok]
    dist = scores.column(schema.DISTANCE).to_numpy(zero_copy_only=False)[ok]
    gone = set()
    for c in np.unique(cluster):
        m = np.nonzero(cluster == c)[0]
        order = keep_order(dist[m], shards[m], keys[m], "farthest", 0)
        removed, _ = brute_force(x[m][order], eps)
        gone |= set(keys[m][order][removed])
    return gone


def test_dedup_stage_removes_the_planted_copies_and_accounts_for_them(ray_cluster, copies_dir, tmp_path):
    out = tmp_path / "out"
    manifest = run(_config(copies_dir["dir"], out))
    removed = _removed(out)
    assert set(_removed(out, column=schema.STATUS).values()) == {schema.STATUS_NEAR_DUPLICATE}
    owned = _owned_files(out)
    # every planted pair: exactly one of the two is gone, and it names the other
    for copy, original in copies_dir["pairs"].items():
        assert (copy in removed) != (original in removed), (copy, original)
        gone = copy if copy in removed else original
        assert removed[gone] == (original if gone == copy else copy)
    assert set(removed) == _reference(out, 0.002)  # exactly the brute-force rule, nothing else
    c = manifest["counts"]
    assert c["removed"] == len(removed) >= N_COPIES and c["removed_by_reason"] == {schema.STATUS_NEAR_DUPLICATE: len(removed)}
    assert c["input_samples"] == 135 == c["kept"] + c["pruned"] + c["removed"] + c["failed"]
    assert c["kept"] == np.floor(0.5 * (135 - c["removed"]) + 0.5)
    scores = pa.concat_tables(pq.read_table(p) for p in sorted((out / "scores").glob("*.parquet"))).to_pylist()
    status = {r[schema.KEY]: r[schema.STATUS] for r in scores}
    assert {k for k, s in status.items() if s == schema.STATUS_NEAR_DUPLICATE} == set(removed)
    assert not any(r[schema.KEEP] for r in scores if r[schema.STATUS] != "ok")
    st = manifest["stages"]["dedup"]
    assert st["removed"] == len(removed) and st["buckets"] == 2 and sum(st["removed_per_shard"].values()) == len(removed)
    bands = json.load(open(out / "pruned" / "bands.json"))["bands"]
    assert bands[-1]["cumulative_samples"] == c["kept"]

    # the same command again: dedup is complete and reused, nothing changes
    again = run(_config(copies_dir["dir"], out))
    assert again["stages"]["dedup"]["reused"] and again["stages"]["dedup"]["removed"] == len(removed)
    assert again["counts"] == c
    assert not list(out.glob("dedup")), "dedup writes only removals/dedup/"

    # scores an older version wrote (its dedup rewrote their statuses, stamped curated_by) are never
    # taken for this selection's, whatever their select stamp says: select makes them again
    first = sorted((out / "scores").glob("*.parquet"))[0]
    table = pq.read_table(first)
    pq.write_table(table.replace_schema_metadata((table.schema.metadata or {}) | {b"curated_by": b"old"}), first)
    legacy = run(_config(copies_dir["dir"], out))
    assert not legacy["stages"]["select"]["reused"] and legacy["counts"] == c
    assert b"curated_by" not in (pq.read_schema(first).metadata or {})

    # dedup dropped from the stage list: its removals are undone, the selection made afresh
    plain = run(_config(copies_dir["dir"], out, stages=("embed", "prototypes", "assign", "select", "write")))
    p = plain["counts"]
    assert p["removed"] == 0 and p["kept"] + p["pruned"] == 135 - p["failed"]
    statuses = {r[schema.STATUS] for f in (out / "scores").glob("*.parquet") for r in pq.read_table(f).to_pylist()}
    assert schema.STATUS_NEAR_DUPLICATE not in statuses
    # no stage rewrote another's files: the assignment and what came before are as assign left them
    assert _owned_files(out) == owned


def test_dedup_on_three_nodes_equals_one_node(copies_dir, local_cluster, tmp_path):
    """The same dedup on a 3-node cluster (tasks placed anywhere, any completion order, other shard
    groups): identical to a local one-node Ray's."""
    one, three = tmp_path / "one", tmp_path / "three"
    run(_config(copies_dir["dir"], one, stages=("embed", "prototypes", "assign", "dedup"), **{"dedup.shards_per_task": 3}))
    shutil.copytree(one / "embeddings", three / "embeddings")
    _, nodes = local_cluster({"num_cpus": 1}, [{"num_cpus": 1}, {"num_cpus": 1}])
    assert len(ray.nodes()) == 3
    run(_config(copies_dir["dir"], three, stages=("embed", "prototypes", "assign", "dedup")))
    for name in ("removals/dedup", "assign"):
        assert list((one / name).glob("*.parquet"))
        for a in sorted((one / name).glob("*.parquet")):
            assert pq.read_table(a).equals(pq.read_table(three / name / a.name)), (name, a.name)


def test_small_runs_get_a_partition_group_and_a_bucket_per_cpu():
    """Placement only (the result is the same either way, see the 3-node test): few samples or shards
    still keep every CPU busy, and the per-task bounds hold when the data is large."""
    from pipelines.stage import Context
    from pipelines.stages.dedup import DedupStage

    stage = DedupStage(dedup=DedupConfig(shards_per_task=16, bucket_rows=1_000_000))
    ctx = Context(out=None, shards={f"{i:05d}": "" for i in range(20)})
    assert [len(g) for g in stage.groups(ctx, cpus=1)] == [16, 4]
    assert [len(g) for g in stage.groups(ctx, cpus=2)] == [10, 10]
    assert [len(g) for g in stage.groups(ctx, cpus=64)] == [1] * 20
    assert sorted(s for g in stage.groups(ctx, cpus=3) for s in g) == sorted(ctx.shards)
    assert stage.bucket_count(20_000, k=10, cpus=1) == 1
    assert stage.bucket_count(20_000, k=10, cpus=2) == 2
    assert stage.bucket_count(20_000, k=3, cpus=8) == 3  # no more buckets than clusters
    assert stage.bucket_count(5_000_000, k=100, cpus=2) == 5  # bucket_rows bounds each



def _pruned_keys(out) -> set[str]:
    keys = set()
    for path in (out / "pruned").glob("*.tar"):
        with tarfile.open(path) as tar:
            keys |= {m.name.rsplit(".", 1)[0] for m in tar.getmembers()}
    return keys


def test_two_curation_stages_compose_and_both_removals_reach_the_shards_and_counts(ray_cluster, copies_dir, tmp_path):
    """dedup then filter (its caption blocklist): each writes only its own removals, the second
    looks only at what the first left, and select and write honour both."""
    out = tmp_path / "out"
    blocklist = "sneaker|bag"
    manifest = run(_config(copies_dir["dir"], out, stages=("embed", "prototypes", "assign", "dedup", "filter", "select", "write"),
                           **{"filter.caption_blocklist": blocklist}))
    dups, blocked = _removed(out), _removed(out, "filter", schema.STATUS)
    assert set(dups) == _reference(out, 0.002)  # dedup's removals as if it ran alone
    captions = {r[schema.KEY]: r["caption"] for p in sorted(copies_dir["dir"].glob("*.parquet"))
                for r in pq.read_table(p, columns=[schema.KEY, "caption"]).to_pylist()}
    matching = {k for k, c in captions.items() if re.search(blocklist, c, re.IGNORECASE)}
    assert set(blocked) == matching - set(dups) and set(blocked.values()) == {schema.STATUS_BLOCKED_CAPTION}

    scores = pa.concat_tables(pq.read_table(p) for p in sorted((out / "scores").glob("*.parquet"))).to_pylist()
    status = {r[schema.KEY]: r[schema.STATUS] for r in scores}
    assert {k for k, s in status.items() if s == schema.STATUS_NEAR_DUPLICATE} == set(dups)
    assert {k for k, s in status.items() if s == schema.STATUS_BLOCKED_CAPTION} == set(blocked)
    kept = {r[schema.KEY] for r in scores if r[schema.KEEP]}
    assert _pruned_keys(out) == kept and not kept & (set(dups) | set(blocked))

    c = manifest["counts"]
    assert c["removed_by_reason"] == {schema.STATUS_NEAR_DUPLICATE: len(dups), schema.STATUS_BLOCKED_CAPTION: len(blocked)}
    assert c["input_samples"] == 135 == c["kept"] + c["pruned"] + c["removed"] + c["failed"]
    # the copies' shard has no parquet: what the rules could not look at is counted, not guessed
    unchecked = sum(1 for copy in copies_dir["pairs"] if copy not in dups)
    assert c["kept"] == len(kept) and manifest["stages"]["filter"]["totals"] == {
        schema.STATUS_BLOCKED_CAPTION: len(blocked), "unchecked_no_metadata": unchecked, "shards_unreadable_metadata": 0}

    # the filter alone changed: dedup is reused, filter, select and write run again
    again = run(_config(copies_dir["dir"], out, stages=("embed", "prototypes", "assign", "dedup", "filter", "select", "write"),
                        **{"filter.caption_blocklist": "sneaker"}))
    st = again["stages"]
    assert st["dedup"]["reused"] and not st["filter"]["reused"] and not st["select"]["reused"] and not st["write"]["reused"]
    assert again["counts"]["removed_by_reason"][schema.STATUS_BLOCKED_CAPTION] < len(blocked)

    # the other order: dedup compares only what the filter left, so a copy whose original the
    # filter removed has nothing left to duplicate and stays
    other = tmp_path / "other"
    shutil.copytree(out / "embeddings", other / "embeddings")
    run(_config(copies_dir["dir"], other, stages=("embed", "prototypes", "assign", "filter", "dedup", "select", "write"),
                **{"filter.caption_blocklist": blocklist}))
    dups2, blocked2 = _removed(other), _removed(other, "filter", schema.STATUS)
    assert set(blocked2) == matching
    filtered_pairs = {copy for copy, original in copies_dir["pairs"].items() if original in matching}
    assert filtered_pairs and filtered_pairs != set(copies_dir["pairs"])  # both kinds of pair occur
    for copy, original in copies_dir["pairs"].items():
        if copy in filtered_pairs:
            assert copy not in dups2 and original not in dups2
        else:
            assert (copy in dups2) != (original in dups2)
