"""The stages of `ssl-prune extend` that differ from a run's: they take from the parent run what a
run would compute over all of its data (Ray wiring; pipelines/extend.py builds the job).

- `ParentPrototypesStage` ("prototypes"): the parent's centroids, copied, not refitted;
- `ExtendSelectStage` ("select"): the parent's recorded thresholds (prune/select/record.py)
  applied to the new samples' priorities: a new sample gets the decision it would have got in the
  parent's run;
- `DriftStage` ("drift", after assign): how far the new samples lie from the parent's prototypes
  against the parent's own samples, and whether to refit (prune/cluster/drift.py);
- `ExtendWriteStage` ("write"): the new kept samples as shards numbered after the parent's, and a
  `sizes.json` / `bands.json` that cover the parent's shards and these.

The other stages are the run's own, on the new shards (the dedup stage with `parents`, across the
boundary).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import ray

from prune import schema
from prune.cluster import drift
from prune.io.storage import OutputDir
from prune.io.tables import read_assignment
from prune.select import record
from prune.select.policies import policy_class
from prune.select.settings import SelectConfig

from ..stage import Context, Stage
from .prototypes import PrototypesStats
from .select import SelectStage, SelectStats, pass_apply
from .write import WriteStage

DRIFT_DIR, DRIFT_FILE = schema.DRIFT_DIR, "drift.json"


class ParentMismatch(ValueError):
    """The parent cannot be extended with these settings (another model, missing records)."""


@dataclass
class ParentPrototypesStage(Stage):
    """`prototypes/`: the parent's centroids and k-means record, with the parent named in it."""

    name = "prototypes"
    reads = ("embed",)

    parent: str = ""  # the parent run's output URL
    parent_fingerprint: str = ""  # the parent's prototypes fingerprint (its manifest's)

    def identity(self, ctx: Context) -> tuple:
        return ("parent", self.parent_fingerprint)

    def complete(self, ctx: Context) -> Optional[PrototypesStats]:
        out = ctx.out
        if not out.exists(schema.PROTOTYPES_DIR, schema.KMEANS_META_FILE):
            return None
        meta = out.read_json(schema.PROTOTYPES_DIR, schema.KMEANS_META_FILE)
        if meta.get("fingerprint") != ctx.fingerprint or not out.exists(schema.PROTOTYPES_DIR, schema.CENTROIDS_FILE):
            return None
        return PrototypesStats(meta["k"], meta["n_ok_total"], meta)

    def run(self, ctx: Context) -> PrototypesStats:
        parent = OutputDir(self.parent)
        with parent.open(schema.PROTOTYPES_DIR, schema.CENTROIDS_FILE) as f:
            ctx.out.write_bytes(f.read(), schema.PROTOTYPES_DIR, schema.CENTROIDS_FILE)
        meta = parent.read_json(schema.PROTOTYPES_DIR, schema.KMEANS_META_FILE)
        meta |= {"fingerprint": ctx.fingerprint, "parent": {"output": self.parent, "fingerprint": meta.get("fingerprint")}}
        ctx.out.write_json(meta, schema.PROTOTYPES_DIR, schema.KMEANS_META_FILE)  # last: present means complete
        return PrototypesStats(meta["k"], meta["n_ok_total"], meta)


@dataclass(frozen=True)
class DriftTask:
    out: OutputDir
    shards: tuple
    per: Optional[np.ndarray] = None  # None: the histogram pass; else the thresholds
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
    overall and per cluster, and whether to refit. Reads the parent's assignment (two columns),
    never its embeddings or tars."""

    name = "drift"
    reads = ("assign",)

    parent: str = ""

    def identity(self, ctx: Context) -> tuple:
        return ("parent", self.parent)

    def complete(self, ctx: Context) -> Optional[DriftStats]:
        if not ctx.out.exists(DRIFT_DIR, DRIFT_FILE):
            return None
        rec = ctx.out.read_json(DRIFT_DIR, DRIFT_FILE)
        return DriftStats(rec) if rec.get("fingerprint") == ctx.fingerprint else None

    def run(self, ctx: Context) -> DriftStats:
        from ..extend import earlier_run
        from ..runtime import TASKS_PER_CPU, batches, map_reduce

        parent = earlier_run(self.parent)
        k = int(ctx.out.read_json(schema.PROTOTYPES_DIR, schema.KMEANS_META_FILE)["k"])
        hist = map_reduce(drift_histogram, [DriftTask(parent.out, tuple(b)) for b in batches(parent.shards, TASKS_PER_CPU)],
                          drift.fold, desc="drift: the parent's distances")
        per, overall = drift.thresholds(hist, k)
        counts = map_reduce(drift_counts, [DriftTask(ctx.out, tuple(b), per, overall, k)
                                           for b in batches(sorted(ctx.shards), TASKS_PER_CPU)],
                            fold_counts, desc="drift: the new samples")
        rec = drift.summarize(counts, per, overall) | {"fingerprint": ctx.fingerprint, "parent": self.parent}
        ctx.out.write_json(rec, DRIFT_DIR, DRIFT_FILE)
        return DriftStats(rec)


@dataclass
class ExtendSelectStage(SelectStage):
    """`scores/` of the new samples, selected by the parent's thresholds; `selection/` again (so
    an extension of this extension selects alike)."""

    parent: str = ""

    def parent_record(self) -> record.SelectionRecord:
        rec = record.load(OutputDir(self.parent))
        if rec is None:
            raise ParentMismatch(f"{self.parent} has no {schema.SELECTION_DIR}/ (it was selected by an ssl-prune "
                                 "older than extend): run its select stage again with this version, then extend it")
        return rec

    def identity(self, ctx: Context) -> tuple:
        return ("parent", self.parent_record().meta["fingerprint"])

    def applied(self, rec: record.SelectionRecord) -> SelectConfig:
        """The parent's select settings as it applied them (what auto chose included)."""
        return SelectConfig(**rec.meta["select"])

    def complete(self, ctx: Context) -> Optional[SelectStats]:
        stats = super().complete(ctx)
        if stats is not None:
            stats.auto = self.parent_record().meta.get("auto")
        return stats

    def edges(self) -> list[float]:
        return self.parent_record().edges

    def run(self, ctx: Context) -> SelectStats:
        rec = self.parent_record()
        select = self.applied(rec)
        policy_class(select.policy)  # registered here too
        strata = None if rec.strata is None else ray.put(rec.strata)
        stats = SelectStats(rec.edges, auto=rec.meta.get("auto"))
        shared = ray.put((rec.cuts, rec.hist))
        for results in self.apply_tasks(ctx, shared, strata, select):
            for res in results:
                stats.add(res)
        record.save(ctx.out, rec.cuts, rec.hist, rec.strata,
                    rec.meta | {"fingerprint": ctx.fingerprint, "parent": {"output": self.parent,
                                                                           "fingerprint": rec.meta["fingerprint"]}})
        return stats

    def apply_tasks(self, ctx: Context, shared, strata, select: SelectConfig):
        from ..runtime import run_tasks

        return run_tasks(pass_apply, self.tasks(ctx, shared, strata, select), desc="select: apply (parent's cuts)")


@dataclass
class ExtendWriteStage(WriteStage):
    """The new kept samples as pruned shards numbered after the parent's; sizes.json and bands.json
    cover the parent's shards (by their URLs) and these."""

    parent: str = ""
    first_shard: int = 0  # the parent's shard count (its own parent's included): these start after it

    def identity(self, ctx: Context) -> tuple:
        return super().identity(ctx) + (("parent", self.parent, self.first_shard),)

    def first_output_shard(self) -> int:
        return self.first_shard

    def finish(self, out: OutputDir) -> None:
        combine_with_parent(out, OutputDir(self.parent))


def combine_with_parent(out: OutputDir, parent: OutputDir) -> None:
    """sizes.json: the parent's entries (its own parent's included) and this write's; bands.json:
    per band this write's shards and the parent's (`parent_shards`: their URLs, the parent's own
    parent's first), and the samples of both."""
    sizes = parent.read_json(schema.PRUNED_DIR, schema.SIZES_FILE) | out.read_json(schema.PRUNED_DIR, schema.SIZES_FILE)
    mine = out.read_json(schema.PRUNED_DIR, schema.BANDS_FILE)
    theirs = {b["band"]: b for b in parent.read_json(schema.PRUNED_DIR, schema.BANDS_FILE)["bands"]}
    cumulative = 0
    for b in mine["bands"]:
        p = theirs.get(b["band"], {})
        b["parent_shards"] = p.get("parent_shards", []) + [parent.url_of(schema.PRUNED_DIR, s) for s in p.get("shards", [])]
        b["samples_with_parent"] = b["samples"] + p.get("samples_with_parent", p.get("samples", 0))
        cumulative += b["samples_with_parent"]
        b["cumulative_samples_with_parent"] = cumulative
    mine["parent"] = parent.url
    out.write_json(sizes, schema.PRUNED_DIR, schema.SIZES_FILE)
    out.write_json(mine, schema.PRUNED_DIR, schema.BANDS_FILE)


