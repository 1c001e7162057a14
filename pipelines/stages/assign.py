"""Assign stage: every sample's nearest prototype and its distance, into `scores/NNNNN.parquet`.

One Ray task per shard (`runtime.run_tasks`): the centroids go to the object store once, and each
task builds their faiss inner-product index (a copy of k x d floats, small beside searching a
shard) and writes the shard's scores file (cluster, distance; selection columns not yet decided)
atomically. Plain tasks, not an actor pool: they reuse the warm workers the stages before left,
where a pool of actors started fresh processes (about 2 s of a 20k-sample run), they keep enough
demand queued for an autoscaler to add nodes, and a task lost with its node is run again by Ray.
Score = 1 - cosine to the nearest centroid. Its outputs are fully determined by the prototypes', so
its fingerprint is theirs; complete when every scores file carries it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from prune import schema
from prune.cluster.kmeans import Assigner, prototype_distance
from prune.cluster.settings import KMeansConfig
from prune.io.exports import ExportConfig, id_column
from prune.io.storage import OutputDir
from prune.io.tables import (
    empty_selection,
    file_metadata,
    load_centroids,
    ok_matrix,
    read_embeddings,
    shard_metadata,
)
from prune.settings import ConfigError

from ..pending import pending, stamped
from ..runtime import resolve, run_tasks
from ..stage import STAGES, Context, Resources, Stage


@dataclass
class AssignStats:
    shards_assigned: int
    shards_reused: int


def assigned_with(out: OutputDir, shard: str, fp: str) -> bool:
    return file_metadata(out, schema.SCORES_DIR, shard).get(schema.META_ASSIGN_FINGERPRINT, b"").decode() == fp


@dataclass(frozen=True)
class AssignTask:
    out: OutputDir  # the OutputDir itself: it pickles with its storage options (a URL would not)
    shard: str
    url: str
    centroids: object  # ObjectRef of the float32 [k, d] centroids, put once per run
    fp: str
    id_col: str = schema.KEY


def assign_shard(task: AssignTask) -> tuple[str, bool]:
    """One shard's scores file -> (shard, whether an earlier attempt had already written it)."""
    out, shard = task.out, task.shard
    if assigned_with(out, shard, task.fp):
        return shard, True
    table = read_embeddings(out, shard)
    ok, x = ok_matrix(table)
    n = len(table)
    cluster = np.full(n, -1, np.int32)
    distance = np.full(n, np.nan, np.float32)
    ids, sims = Assigner(resolve(task.centroids))(x)
    cluster[ok], distance[ok] = ids, prototype_distance(sims)
    invalid = np.zeros(n, bool)
    invalid[ok] = (ids < 0) | ~np.isfinite(sims) | ~np.isfinite(x).all(axis=1)
    if invalid.any():  # a model that produced NaN/inf: record it, never score it
        ok = ok & ~invalid
        cluster[invalid], distance[invalid] = -1, np.nan
        status = np.asarray(table.column(schema.STATUS).to_pylist(), dtype=object)
        status[invalid] = schema.STATUS_BAD_EMBEDDING
        table = table.set_column(table.schema.get_field_index(schema.STATUS), schema.STATUS, pa.array(status, pa.string()))
    src_meta = table.schema.metadata or {}
    meta = {schema.META_ASSIGN_FINGERPRINT: task.fp.encode()}
    if schema.META_SHARD_ERROR in src_meta:
        meta[schema.META_SHARD_ERROR] = src_meta[schema.META_SHARD_ERROR]
    scores = empty_selection(table, cluster, distance, ok).replace_schema_metadata(meta)
    if task.id_col != schema.KEY:  # the id users join on (export.id_col, e.g. DataComp's uid)
        ids = id_column(scores.column(schema.KEY).combine_chunks(), shard_metadata(out, shard, task.url), task.id_col)
        scores = scores.append_column(task.id_col, ids)
    with out.open_atomic(schema.SCORES_DIR, schema.shard_file(shard)) as f:
        pq.write_table(scores, f)
    return shard, False


@STAGES.register
@dataclass
class AssignStage(Stage):
    name = "assign"
    requires = ("prototypes",)

    kmeans: KMeansConfig = field(default_factory=KMeansConfig)  # only assign_concurrency: placement
    export: ExportConfig = field(default_factory=ExportConfig)  # only id_col: scores carry that id

    def setup(self) -> None:
        if self.export.id_col != schema.KEY and self.export.id_col in schema.SCORES_SCHEMA.names:
            raise ConfigError(f"export.id_col {self.export.id_col!r} is a column scores already have; "
                              f"name the input's id column (e.g. uid)")

    def identity(self, ctx: Context) -> Optional[tuple]:
        # the scores' cluster and distance are a function of the centroids alone; an id column
        # other than the key is carried from the input's metadata
        return None if self.export.id_col == schema.KEY else (("id_col", self.export.id_col),)

    def resources(self, ctx: Context) -> Resources:
        return Resources(num_cpus=1)

    def complete(self, ctx: Context) -> Optional[AssignStats]:
        is_done = functools.partial(stamped, schema.SCORES_DIR, schema.META_ASSIGN_FINGERPRINT, ctx.fingerprint)
        if not pending(ctx.out, ctx.shards, is_done):
            return AssignStats(0, len(ctx.shards))
        return None

    def run(self, ctx: Context) -> AssignStats:
        centroids = ray.put(load_centroids(ctx.out))
        tasks = [AssignTask(ctx.out, shard, url, centroids, ctx.fingerprint, self.export.id_col)
                 for shard, url in sorted(ctx.shards.items())]
        stats = AssignStats(0, 0)
        for _, reused in run_tasks(assign_shard, tasks, desc="assign: shards",
                                   max_in_flight=self.kmeans.assign_concurrency, **self.resources(ctx).ray_args()):
            stats.shards_reused += int(reused)
            stats.shards_assigned += int(not reused)
        return stats
