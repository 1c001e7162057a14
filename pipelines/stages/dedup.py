"""Dedup stage: SemDeDup inside every cluster, a curation stage after assign and before select.

Three passes of Ray tasks, none of which sends per-sample data through the driver:
1. partition: each task reads a group of shards' assignment and embeddings and writes their samples
   that are ok and that no curation stage before this one removed (cluster, shard, key, distance,
   embedding) into cluster buckets (`cluster % n_buckets`), one file per (bucket, shard group): the
   cluster-partitioned layout SemDeDup and NeMo Curator write;
2. dedup: one task per bucket reads its files and runs `semdedup.dedup_cluster` on each cluster,
   in blocks of bounded memory, and writes the removed samples per shard group;
3. apply: one task per shard group writes `removals/dedup/NNNNN.parquet` (who was removed, with the
   reason `near_duplicate`, and whom it duplicates), stamped with this stage's fingerprint.
It writes nothing else: select reads these removals. Complete when every shard's file carries
this fingerprint.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from prune import schema
from prune.dedup.semdedup import dedup_cluster
from prune.dedup.settings import DedupConfig
from prune.io.storage import OutputDir
from prune.io.tables import ok_matrix, read_embeddings, read_parquet, surviving, write_removals

from ..pending import footer, per_shard
from ..runtime import cluster_cpus, run_tasks
from ..stage import STAGES, Context, Stage

_PART_COLUMNS = (schema.CLUSTER, schema.SHARD, schema.KEY, schema.DISTANCE, schema.EMBEDDING)


@dataclass
class DedupStats:
    clusters: int = 0
    members: int = 0  # ok samples compared
    removed: int = 0  # marked near_duplicate
    buckets: int = 0
    removed_per_shard: dict = field(default_factory=dict)
    compared_with_earlier_runs: int = 0  # extend: the earlier runs' survivors read (clusters of new samples only)


@dataclass(frozen=True)
class PartitionTask:
    out: OutputDir
    group: int
    shards: tuple  # the group's shard ids
    staging: str
    n_buckets: int
    removals: tuple = ()  # the curation stages before this one: their removals are not compared
    source: Optional[OutputDir] = None  # an earlier run (extend's parent) whose survivors are read; None: this run
    clusters: Optional[frozenset] = None  # with `source`: only these clusters (the new samples')
    source_index: int = 0  # with `source`: which earlier run (file names in the staging area)


@dataclass(frozen=True)
class BucketTask:
    out: OutputDir
    bucket: int
    staging: str
    group_of: dict  # shard -> its group
    settings: DedupConfig


@dataclass(frozen=True)
class ApplyTask:
    out: OutputDir
    group: int
    shards: tuple
    staging: str
    fp: str


def partition(task: PartitionTask) -> dict:
    """A group of shards' ok samples -> one file per cluster bucket; -> the rows written and
    their clusters. With `source`, an earlier run's survivors of `clusters`, marked fixed."""
    parts: list[pa.Table] = []
    src = task.source or task.out
    for shard in task.shards:
        scores, status = surviving(src, shard, task.removals, (schema.KEY, schema.STATUS, schema.CLUSTER, schema.DISTANCE))
        ok = status == schema.STATUS_OK
        if task.clusters is not None:
            ok &= np.isin(scores.column(schema.CLUSTER).to_numpy(), np.fromiter(task.clusters, np.int64))
        if task.source is not None and not ok.any():
            continue  # the parent's embeddings of clusters no new sample falls in are not read
        emb = read_embeddings(src, shard, columns=[schema.STATUS, schema.EMBEDDING])
        emb_ok, x = ok_matrix(emb)  # embeddings rows line up with the assignment's (assign keeps the order)
        rows = np.nonzero(ok)[0]
        # the embedding of each used row: its position among the embeddings' ok rows
        vec_of_row = np.cumsum(emb_ok) - 1
        vecs = x[vec_of_row[rows]].astype(np.float16)
        dim = x.shape[1]
        parts.append(pa.table({
            schema.CLUSTER: scores.column(schema.CLUSTER).take(pa.array(rows)),
            schema.SHARD: pa.array([shard] * len(rows), pa.string()),
            schema.KEY: scores.column(schema.KEY).take(pa.array(rows)),
            schema.DISTANCE: scores.column(schema.DISTANCE).take(pa.array(rows)),
            schema.EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), dim),
            schema.FIXED: pa.array(np.full(len(rows), task.source is not None)),
            schema.RUN_OUTPUT: pa.array([task.source.url if task.source is not None else ""] * len(rows), pa.string()),
        }))
    table = pa.concat_tables(parts) if parts else None
    if table is None or len(table) == 0:
        return {"rows": 0, "clusters": []}
    bucket = table.column(schema.CLUSTER).to_numpy() % task.n_buckets
    for b in np.unique(bucket):
        name = f"g{task.group:06d}.parquet" if task.source is None else f"p{task.source_index:03d}-g{task.group:06d}.parquet"
        with task.out.open_atomic(task.staging, "parts", f"b{b:06d}", name) as f:
            pq.write_table(table.filter(pa.array(bucket == b)), f)
    return {"rows": len(table), "clusters": np.unique(table.column(schema.CLUSTER).to_numpy()).tolist()}


def dedup_bucket(task: BucketTask) -> dict:
    """Every cluster of one bucket -> the removed samples, written per shard group."""
    out, s = task.out, task.settings
    files = [f for f in out.find(task.staging, "parts", f"b{task.bucket:06d}") if f.endswith(".parquet")]
    if not files:
        return {"clusters": 0, "members": 0, "removed": 0}
    tables = []
    for name in files:
        with out.open(task.staging, "parts", f"b{task.bucket:06d}", name) as f:
            tables.append(read_parquet(f))
    t = pa.concat_tables(tables)
    cluster = t.column(schema.CLUSTER).to_numpy()
    shards = t.column(schema.SHARD).to_numpy(zero_copy_only=False)
    keys = t.column(schema.KEY).to_numpy(zero_copy_only=False)
    dist = t.column(schema.DISTANCE).to_numpy(zero_copy_only=False)
    col = t.column(schema.EMBEDDING).combine_chunks()
    x = col.flatten().to_numpy(zero_copy_only=False).reshape(len(t), col.type.list_size)
    fixed = t.column(schema.FIXED).to_numpy(zero_copy_only=False)
    run = t.column(schema.RUN_OUTPUT).to_numpy(zero_copy_only=False)
    removed_rows, dup_rows, sims = [], [], []
    ids = np.unique(cluster[~fixed])  # an earlier run's survivors only where a new sample is
    for c in ids:
        members = np.nonzero(cluster == c)[0]
        res = dedup_cluster(x[members], dist[members], shards[members], keys[members], s.eps, s.keep, s.seed, s.block_rows,
                            fixed=fixed[members] if fixed[members].any() else None)
        removed_rows.append(members[res.removed])
        dup_rows.append(members[res.duplicate_of[res.removed]])
        sims.append(res.similarity[res.removed])
    removed = np.concatenate(removed_rows) if removed_rows else np.zeros(0, np.int64)
    dups = np.concatenate(dup_rows) if dup_rows else np.zeros(0, np.int64)
    sim = np.concatenate(sims) if sims else np.zeros(0, np.float32)
    result = pa.table({
        schema.SHARD: pa.array(shards[removed], pa.string()),
        schema.KEY: pa.array(keys[removed], pa.string()),
        schema.STATUS: pa.array([schema.STATUS_NEAR_DUPLICATE] * len(removed), pa.string()),
        schema.CLUSTER: pa.array(cluster[removed], pa.int32()),
        schema.DUPLICATE_OF_SHARD: pa.array(shards[dups], pa.string()),
        schema.DUPLICATE_OF: pa.array(keys[dups], pa.string()),
        schema.SIMILARITY: pa.array(sim, pa.float32()),
        schema.DUPLICATE_OF_OUTPUT: pa.array([r or None for r in run[dups]], pa.string()),
    })
    group = np.array([task.group_of[sh] for sh in shards[removed]], np.int64)
    for g in np.unique(group):
        with out.open_atomic(task.staging, "removed", f"g{g:06d}", f"b{task.bucket:06d}.parquet") as f:
            pq.write_table(result.filter(pa.array(group == g)), f)
    return {"clusters": len(ids), "members": int((~fixed).sum()), "removed": len(removed),
            "compared_with_earlier_runs": int(fixed.sum())}


def apply_group(task: ApplyTask) -> dict:
    """One shard group's removals/dedup/NNNNN.parquet files; -> removed per shard."""
    out = task.out
    names = [f for f in out.find(task.staging, "removed", f"g{task.group:06d}") if f.endswith(".parquet")]
    tables = []
    for name in names:
        with out.open(task.staging, "removed", f"g{task.group:06d}", name) as f:
            tables.append(read_parquet(f))
    removed = pa.concat_tables(tables) if tables else None
    counts = {}
    for shard in task.shards:
        mine = removed.filter(pc.equal(removed.column(schema.SHARD), shard)) if removed is not None else None
        rows = mine.drop_columns([schema.SHARD]).sort_by(schema.KEY) if mine is not None and len(mine) else \
            schema.DEDUP_SCHEMA.empty_table()
        write_removals(out, DedupStage.name, shard, rows.select(schema.DEDUP_SCHEMA.names).cast(schema.DEDUP_SCHEMA), task.fp)
        counts[shard] = len(rows)
    return counts


@STAGES.register
@dataclass
class DedupStage(Stage):
    """Near-duplicates inside each cluster, removed as `near_duplicate` in removals/dedup/."""

    name = "dedup"
    reads = ("assign", "embed")
    removes = True

    dedup: DedupConfig = field(default_factory=DedupConfig)
    # an extension's earlier runs (its parent first, then the parent's own): their survivors in the
    # clusters the new samples fall in are compared with, never removed (pipelines/extend.py)
    parents: tuple = field(default=(), metadata={"fingerprint": False})

    def identity(self, ctx: Context) -> tuple:
        base = super().identity(ctx)
        return base + (("parents", self.parents),) if self.parents else base

    def groups(self, ctx: Context, cpus: int = 1) -> list[tuple]:
        """Consecutive shards, `shards_per_task` at most a group, fewer when that leaves a CPU idle."""
        shards = sorted(ctx.shards)
        g = max(1, min(self.dedup.shards_per_task, math.ceil(len(shards) / cpus)))
        return [tuple(shards[i : i + g]) for i in range(0, len(shards), g)]

    def bucket_count(self, n_ok: int, k: int, cpus: int) -> int:
        """`bucket_rows` bounds a bucket; with few samples, still a bucket per CPU (while clusters last)."""
        return max(1, math.ceil(n_ok / self.dedup.bucket_rows), min(k, cpus))

    def partition_parents(self, out: OutputDir, staging: str, n_buckets: int, clusters: frozenset, cpus: int) -> int:
        """Each earlier run's survivors (after its curation stages, dedup included) in `clusters`,
        into the same buckets, marked fixed; -> how many."""
        from ..parents import earlier_run  # the parent's shards and curation stages, from its manifest

        tasks = []
        for i, url in enumerate(self.parents):
            run = earlier_run(url)
            groups = [tuple(run.shards[j:j + self.dedup.shards_per_task]) for j in range(0, len(run.shards), self.dedup.shards_per_task)]
            tasks += [PartitionTask(out, gi, grp, staging, n_buckets, run.removals, run.out, clusters, i)
                      for gi, grp in enumerate(groups)]
        return sum(res["rows"] for res in run_tasks(partition, tasks, desc="dedup: earlier runs' survivors"))

    def complete(self, ctx: Context) -> Optional[DedupStats]:
        fp = ctx.fingerprint
        footers = per_shard(ctx.out, ctx.shards, functools.partial(footer, schema.removals_dir(self.name)))
        if any(meta.get(schema.META_REMOVALS_FINGERPRINT, b"").decode() != fp for meta, _ in footers.values()):
            return None
        removed = {s: rows for s, (_, rows) in footers.items()}
        return DedupStats(removed=sum(removed.values()), removed_per_shard=removed)

    def run(self, ctx: Context) -> DedupStats:
        out = ctx.out
        staging = f"{schema.STAGING_DIR}/dedup-{ctx.fingerprint}"
        out.remove(staging)  # a half-done earlier attempt: its parts would be counted twice
        kmeans = out.read_json(schema.PROTOTYPES_DIR, schema.KMEANS_META_FILE)
        cpus = cluster_cpus()
        n_buckets = self.bucket_count(int(kmeans["n_ok_total"]), int(kmeans["k"]), cpus)
        groups = self.groups(ctx, cpus)
        group_of = {s: gi for gi, grp in enumerate(groups) for s in grp}
        parts = run_tasks(partition, [PartitionTask(out, gi, grp, staging, n_buckets, ctx.removals)
                                      for gi, grp in enumerate(groups)], desc="dedup: partition by cluster")
        clusters = frozenset(c for res in parts for c in res["clusters"])
        stats = DedupStats(buckets=n_buckets)
        if self.parents:
            stats.compared_with_earlier_runs = self.partition_parents(out, staging, n_buckets, clusters, cpus)
        buckets = [BucketTask(out, b, staging, group_of, self.dedup) for b in range(n_buckets)]
        for res in run_tasks(dedup_bucket, buckets, desc="dedup: clusters"):
            stats.clusters += res["clusters"]
            stats.members += res["members"]
            stats.removed += res["removed"]
        per_shard: Counter = Counter()
        for res in run_tasks(apply_group, [ApplyTask(out, gi, grp, staging, ctx.fingerprint) for gi, grp in enumerate(groups)],
                             desc="dedup: apply"):
            per_shard.update(res)
        stats.removed_per_shard = dict(sorted(per_shard.items()))
        out.remove(staging)
        return stats
