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


@dataclass(frozen=True)
class PartitionTask:
    out: OutputDir
    group: int
    shards: tuple  # the group's shard ids
    staging: str
    n_buckets: int
    removals: tuple = ()  # the curation stages before this one: their removals are not compared


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


def partition(task: PartitionTask) -> int:
    """A group of shards' ok samples -> one file per cluster bucket; returns the rows written."""
    parts: list[pa.Table] = []
    for shard in task.shards:
        scores, status = surviving(task.out, shard, task.removals, (schema.KEY, schema.STATUS, schema.CLUSTER, schema.DISTANCE))
        emb = read_embeddings(task.out, shard, columns=[schema.STATUS, schema.EMBEDDING])
        emb_ok, x = ok_matrix(emb)  # embeddings rows line up with the assignment's (assign keeps the order)
        rows = np.nonzero(status == schema.STATUS_OK)[0]
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
        }))
    table = pa.concat_tables(parts) if parts else None
    if table is None or len(table) == 0:
        return 0
    bucket = table.column(schema.CLUSTER).to_numpy() % task.n_buckets
    for b in np.unique(bucket):
        with task.out.open_atomic(task.staging, "parts", f"b{b:06d}", f"g{task.group:06d}.parquet") as f:
            pq.write_table(table.filter(pa.array(bucket == b)), f)
    return len(table)


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
    removed_rows, dup_rows, sims = [], [], []
    ids = np.unique(cluster)
    for c in ids:
        members = np.nonzero(cluster == c)[0]
        res = dedup_cluster(x[members], dist[members], shards[members], keys[members], s.eps, s.keep, s.seed, s.block_rows)
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
    })
    group = np.array([task.group_of[sh] for sh in shards[removed]], np.int64)
    for g in np.unique(group):
        with out.open_atomic(task.staging, "removed", f"g{g:06d}", f"b{task.bucket:06d}.parquet") as f:
            pq.write_table(result.filter(pa.array(group == g)), f)
    return {"clusters": len(ids), "members": len(t), "removed": len(removed)}


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

    def groups(self, ctx: Context, cpus: int = 1) -> list[tuple]:
        """Consecutive shards, `shards_per_task` at most a group, fewer when that leaves a CPU idle."""
        shards = sorted(ctx.shards)
        g = max(1, min(self.dedup.shards_per_task, math.ceil(len(shards) / cpus)))
        return [tuple(shards[i : i + g]) for i in range(0, len(shards), g)]

    def bucket_count(self, n_ok: int, k: int, cpus: int) -> int:
        """`bucket_rows` bounds a bucket; with few samples, still a bucket per CPU (while clusters last)."""
        return max(1, math.ceil(n_ok / self.dedup.bucket_rows), min(k, cpus))

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
        list(run_tasks(partition, [PartitionTask(out, gi, grp, staging, n_buckets, ctx.removals)
                                   for gi, grp in enumerate(groups)],
                       desc="dedup: partition by cluster"))
        stats = DedupStats(buckets=n_buckets)
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
