"""Drift stage of `ssl-prune extend`, after assign: how far the new samples lie from the parent's
prototypes against the parent's own samples, and whether to refit (prune/cluster/drift.py).

Two passes of tasks: the parent's assignment (cluster and distance only; never its embeddings or
tars) into per-cluster distance histograms, folded in tasks, whose 95th percentiles the second
pass counts the new samples against. Writes `drift/drift.json`; not a stage a run lists (it needs
a parent), so it is not registered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from prune import schema
from prune.cluster import drift
from prune.io.storage import OutputDir
from prune.io.tables import read_assignment

from ..parents import earlier_run
from ..runtime import TASKS_PER_CPU, batches, map_reduce
from ..stage import Context, Stage

DRIFT_FILE = "drift.json"


@dataclass(frozen=True)
class DriftTask:
    out: OutputDir
    shards: tuple
    per: Optional[np.ndarray] = None  # None: the histogram pass; else the per-cluster thresholds
    overall: float = 0.0
    k: int = 0


def _ok_assignment(out: OutputDir, shard: str) -> tuple[np.ndarray, np.ndarray]:
    t = read_assignment(out, shard, [schema.STATUS, schema.CLUSTER, schema.DISTANCE])
    ok = t.column(schema.STATUS).to_numpy(zero_copy_only=False) == schema.STATUS_OK
    return t.column(schema.CLUSTER).to_numpy()[ok], t.column(schema.DISTANCE).to_numpy(zero_copy_only=False)[ok]


def drift_histogram(task: DriftTask):
    return drift.fold(drift.sparse_histogram(*_ok_assignment(task.out, s)) for s in task.shards)


def drift_counts(task: DriftTask) -> dict:
    return fold_counts(drift.beyond_counts(*_ok_assignment(task.out, s), task.per, task.overall, task.k)
                       for s in task.shards)


def fold_counts(parts) -> dict:
    parts = list(parts)
    return {key: sum(p[key] for p in parts) for key in parts[0]}


@dataclass
class DriftStats:
    record: dict


@dataclass
class DriftStage(Stage):
    """`drift/drift.json`: the share of new samples beyond the parent's 95th percentile distance,
    overall and per cluster, and whether to refit."""

    name = "drift"
    reads = ("assign",)

    parent: str = ""

    def identity(self, ctx: Context) -> tuple:
        return ("parent", self.parent)

    def complete(self, ctx: Context) -> Optional[DriftStats]:
        if not ctx.out.exists(schema.DRIFT_DIR, DRIFT_FILE):
            return None
        rec = ctx.out.read_json(schema.DRIFT_DIR, DRIFT_FILE)
        return DriftStats(rec) if rec.get("fingerprint") == ctx.fingerprint else None

    def run(self, ctx: Context) -> DriftStats:
        parent = earlier_run(self.parent)
        k = int(ctx.out.read_json(schema.PROTOTYPES_DIR, schema.KMEANS_META_FILE)["k"])
        hist = map_reduce(drift_histogram, [DriftTask(parent.out, tuple(b)) for b in batches(parent.shards, TASKS_PER_CPU)],
                          drift.fold, desc="drift: the parent's distances")
        per, overall = drift.thresholds(hist, k)
        counts = map_reduce(drift_counts, [DriftTask(ctx.out, tuple(b), per, overall, k)
                                           for b in batches(sorted(ctx.shards), TASKS_PER_CPU)],
                            fold_counts, desc="drift: the new samples")
        rec = drift.summarize(counts, per, overall) | {"fingerprint": ctx.fingerprint, "parent": self.parent}
        ctx.out.write_json(rec, schema.DRIFT_DIR, DRIFT_FILE)
        return DriftStats(rec)
