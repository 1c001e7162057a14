"""Assign stage: every sample's nearest prototype and its distance, into `assign/NNNNN.parquet`.

A shard stage (the executor runs it): one Ray task per shard; the centroids go to the object store
once, and each task builds their faiss inner-product index and writes the shard's assignment
atomically. Plain tasks, not an actor pool: they reuse the warm workers the stages before left,
where a pool of actors started fresh processes (about 2 s of a 20k-sample run), they keep enough
demand queued for an autoscaler to add nodes, and a task lost with its node is run again by Ray.
Score = 1 - cosine to the nearest centroid. Its outputs are fully determined by the prototypes', so
its fingerprint is theirs; complete when every assignment file carries it. The selection (select)
makes `scores/` from it.
"""

from __future__ import annotations

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
from prune.io.tables import assignment, load_centroids, ok_matrix, read_embeddings, shard_metadata
from prune.settings import ConfigError

from ..runtime import resolve
from ..shard_stage import ShardJob, ShardStage
from ..stage import STAGES, Context, Resources


@dataclass
class AssignStats:
    shards_assigned: int
    shards_reused: int


@STAGES.register
@dataclass
class AssignStage(ShardStage):
    """Every sample's nearest prototype and its distance, in `assign/NNNNN.parquet`."""

    name = "assign"
    reads = ("prototypes", "embed")
    output_dir = schema.ASSIGN_DIR
    stamp_key = schema.META_ASSIGN_FINGERPRINT
    shards_per_task = 1  # a task per shard: queued demand for an autoscaler, and Ray re-runs one lost with its node

    kmeans: KMeansConfig = field(default_factory=KMeansConfig)  # only assign_concurrency: placement
    export: ExportConfig = field(default_factory=ExportConfig)  # only id_col: the assignment carries that id
    _centroids: object = field(default=None, init=False, repr=False, compare=False)  # an ObjectRef, put once a run

    def setup(self) -> None:
        if self.export.id_col != schema.KEY and self.export.id_col in schema.SCORES_SCHEMA.names:
            raise ConfigError(f"export.id_col {self.export.id_col!r} is a column scores already have; "
                              f"name the input's id column (e.g. uid)")

    def identity(self, ctx: Context) -> Optional[tuple]:
        # cluster and distance are a function of the centroids alone; an id column other than the
        # key is carried from the input's metadata
        return None if self.export.id_col == schema.KEY else (("id_col", self.export.id_col),)

    def resources(self, ctx: Context) -> Resources:
        return Resources(num_cpus=1)

    def max_in_flight(self) -> Optional[int]:
        return self.kmeans.assign_concurrency

    def run(self, ctx: Context) -> AssignStats:
        self._centroids = ray.put(load_centroids(ctx.out))  # to the object store once, not per task
        try:
            return super().run(ctx)
        finally:
            self._centroids = None

    def process_shard(self, job: ShardJob) -> dict:
        """One shard's assignment, written atomically: faiss's inner-product index over the centroids
        (a copy of k x d floats per task, small beside searching a shard)."""
        out, shard = job.out, job.shard
        table = read_embeddings(out, shard)
        ok, x = ok_matrix(table)
        n = len(table)
        cluster = np.full(n, -1, np.int32)
        distance = np.full(n, np.nan, np.float32)
        ids, sims = Assigner(resolve(self._centroids))(x)
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
        meta = {schema.META_ASSIGN_FINGERPRINT: job.fingerprint.encode()}
        if schema.META_SHARD_ERROR in src_meta:
            meta[schema.META_SHARD_ERROR] = src_meta[schema.META_SHARD_ERROR]
        result = assignment(table, cluster, distance, ok).replace_schema_metadata(meta)
        if self.export.id_col != schema.KEY:  # the id users join on (export.id_col, e.g. DataComp's uid)
            ids = id_column(result.column(schema.KEY).combine_chunks(), shard_metadata(out, shard, job.url), self.export.id_col)
            result = result.append_column(self.export.id_col, ids)
        with out.open_atomic(schema.ASSIGN_DIR, schema.shard_file(shard)) as f:
            pq.write_table(result, f)
        return {}

    def summarize(self, computed: dict, reused: dict) -> AssignStats:
        return AssignStats(len(computed), len(reused))
