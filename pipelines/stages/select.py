"""Select stage: exact keep thresholds from per-shard histograms, then `keep`/`band` per sample.

It reads the assignment (`assign/`) and the removals of every curation stage before it
(`removals/<stage>/`: a removed sample takes the first such stage's reason as its status and is
never selected), and writes `scores/`, the one file per shard users read: the assignment's
columns, statuses with the removals, and the selection's columns.

Three light passes over the assignment, each a set of tasks over a few shards each (at most
`TASKS_PER_CPU` tasks per CPU, so a small run does not pay Ray's per-task cost per shard):
histograms (reduced in tasks), the priorities inside the cut bins, and the rewrite of each scores
file with priority, percentile, keep and band. The cut-finding itself is the library's (`cuts.exact_cuts`, which
`evaluate` calls too); the driver holds histograms and cut-bin values only, never a column of
every sample.

Each scores file is written in one atomic write (a rename locally, one upload on S3: readers see
the old file or the new one) and stamped with the select fingerprint; a retried task writes the
same bytes again. Complete when every scores file carries this fingerprint.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from prune import schema
from prune.io.settings import WriteConfig
from prune.io.storage import OutputDir
from prune.io.tables import file_metadata, load_centroids, read_scores, surviving
from prune.select import auto, cuts, record
from prune.select.budgets import ClusterStats, dense_sums, distance_sums
from prune.select.policies import Policy, block_priorities, policy_class, selection_groups
from prune.select.settings import SelectConfig
from prune.select.strata import DIST_BINS, plan_strata, sparse_distance_histogram

from ..pending import pending, per_shard
from ..runtime import TASKS_PER_CPU, batches, map_reduce, resolve, run_tasks
from ..stage import STAGES, Context, Stage

log = logging.getLogger("ssl_prune")


@dataclass
class ShardSelection:
    """One scores file's counts after selection."""

    shard: str
    samples: int
    kept: int
    pruned: int
    failed: dict  # status -> samples
    removed: dict  # removal status (a curation stage's, e.g. near_duplicate) -> samples
    bands: dict  # band -> kept samples
    shard_error: Optional[str]


@dataclass
class SelectStats:
    edges: list  # the keep fraction that ends each band
    samples: int = 0
    kept: int = 0
    pruned: int = 0
    failed: dict = field(default_factory=dict)  # status -> samples that failed with it
    removed: dict = field(default_factory=dict)  # removal status -> samples a curation stage removed
    kept_per_band: dict = field(default_factory=dict)
    shard_failures: dict = field(default_factory=dict)  # shard -> why it yielded no sample
    refine_passes: int = 0  # passes that narrowed the cut bins (prune/select/cuts.py)
    boundary_values: int = 0  # priorities the last pass returned to the driver (at most limit per cut)
    auto: Optional[dict] = None  # select.policy auto: the rule chosen, the statistic and why (AutoChoice)

    def add(self, s: ShardSelection) -> None:
        self.samples, self.kept, self.pruned = self.samples + s.samples, self.kept + s.kept, self.pruned + s.pruned
        self.failed = dict(Counter(self.failed) + Counter(s.failed))
        self.removed = dict(Counter(self.removed) + Counter(s.removed))
        self.kept_per_band = {int(b): n for b, n in sorted((Counter(self.kept_per_band) + Counter(s.bands)).items())}
        if s.shard_error:
            self.shard_failures[s.shard] = s.shard_error


@dataclass(frozen=True)
class SelectTask:
    out: OutputDir
    shards: tuple[str, ...]  # scores files, handled one after the other
    select: SelectConfig
    policy: type[Policy]  # resolved on the driver, where every policy is registered
    fp: str = ""
    payload: object = None  # histograms: the HistogramSpec; refine: a Refinement; cut bins: the Window; apply: (Cuts, histogram)
    removals: tuple = ()  # the curation stages before select, in the list's order
    strata: object = None  # for a policy that uses strata: the groups' CCS strata (an ObjectRef)


def assigned(task: SelectTask, shard: str, columns=None) -> tuple[pa.Table, np.ndarray]:
    """A shard's assignment (`columns`, KEY and STATUS among them) with the statuses the curation
    stages' removals give; -> (that table, the statuses)."""
    return surviving(task.out, shard, task.removals, columns)


def _load(task: SelectTask, shard: str) -> tuple[pa.Table, np.ndarray, np.ndarray, np.ndarray]:
    """A shard's assignment with the removals, its ok mask, and the ok rows' priorities and groups."""
    table, status = assigned(task, shard)
    ok = status == schema.STATUS_OK
    keys = table.column(schema.KEY).to_numpy(zero_copy_only=False)[ok]
    dist = table.column(schema.DISTANCE).to_numpy(zero_copy_only=False)[ok].astype(np.float64)
    cluster = table.column(schema.CLUSTER).to_numpy()[ok]
    s = task.select
    prio, groups = block_priorities(task.policy, s.seed, s.balanced, shard, keys, dist, cluster,
                                    resolve(task.strata))
    return table, ok, prio, groups


def _strata_histogram(task: SelectTask, shard: str):
    table, status = assigned(task, shard, [schema.KEY, schema.STATUS, schema.CLUSTER, schema.DISTANCE])
    ok = status == schema.STATUS_OK
    groups = selection_groups(task.select.balanced, table.column(schema.CLUSTER).to_numpy()[ok])
    return sparse_distance_histogram(groups, table.column(schema.DISTANCE).to_numpy(zero_copy_only=False)[ok])


def pass_tail(task: SelectTask) -> np.ndarray:
    """select.policy auto: the histogram of every assigned sample's prototype distance (before any
    curation stage's removals: the pool as it came), for the rule's tail statistic."""
    parts = []
    for shard in task.shards:
        table, status = surviving(task.out, shard, (), [schema.KEY, schema.STATUS, schema.DISTANCE])
        ok = status == schema.STATUS_OK
        parts.append(auto.distance_histogram(table.column(schema.DISTANCE).to_numpy(zero_copy_only=False)[ok]))
    return fold_sum(parts)


def fold_sum(parts) -> np.ndarray:
    return functools.reduce(np.add, parts)


def pass_strata(task: SelectTask):
    """Pass 0, for a policy that uses strata: the sparse per-group histogram of the distances."""
    return cuts.fold_sparse(_strata_histogram(task, shard) for shard in task.shards)


def _histograms(task: SelectTask, shard: str):
    table, ok, prio, groups = _load(task, shard)
    dist = table.column(schema.DISTANCE).to_numpy(zero_copy_only=False)[ok]
    return cuts.sparse_histogram(prio, groups, task.payload), distance_sums(groups, dist)


def pass_histogram(task: SelectTask):
    """-> (sparse histogram of the priorities, sparse per-group distance sums): the sums are what
    a budget that weighs clusters by their spread (dbp) needs."""
    return fold_histograms(_histograms(task, shard) for shard in task.shards)


def fold_histograms(parts) -> tuple:
    """The reduce of `pass_histogram`'s results, in tasks: one pair reaches the driver."""
    parts = list(parts)
    return cuts.fold_sparse(h for h, _ in parts), cuts.fold_sparse(s for _, s in parts)


def pass_refine(task: SelectTask):
    """A refinement pass: counts of the next bits inside the cut bins still too full."""
    step = resolve(task.payload)
    return cuts.fold_sparse(cuts.refinement_histogram(*_load(task, shard)[2:], step) for shard in task.shards)


def pass_boundary(task: SelectTask):
    """The last pass: the priorities in the cut bins, of every shard of the task at once."""
    window = resolve(task.payload)
    parts = [cuts.boundary_values(*_load(task, shard)[2:], window) for shard in task.shards]
    return np.concatenate([c for c, _ in parts]), np.concatenate([v for _, v in parts])


def _counts(shard: str, table: pa.Table, ok, keep, band, meta: dict) -> ShardSelection:
    statuses = table.column(schema.STATUS).to_numpy(zero_copy_only=False)
    not_ok = Counter(s for s in statuses if s != schema.STATUS_OK)
    removed = {s: n for s, n in not_ok.items() if schema.is_removal([s])[0]}
    return ShardSelection(
        shard, len(table), int(keep.sum()), int((ok & ~keep).sum()),
        {s: n for s, n in not_ok.items() if s not in removed}, removed,
        dict(Counter(int(b) for b in band[keep])),
        meta.get(schema.META_SHARD_ERROR, b"").decode() or None,
    )


def pass_apply(task: SelectTask) -> list[ShardSelection]:
    """Rewrite the task's scores files with their selection; return their counts for the manifest."""
    found, hist = resolve(task.payload)
    return [_apply(task, shard, found, hist) for shard in task.shards]


def _apply(task: SelectTask, shard: str, found: cuts.Cuts, hist: np.ndarray) -> ShardSelection:
    table, ok, prio, groups = _load(task, shard)
    keep_ok, band_ok, pct_ok = found.apply(prio, groups, hist)
    n = len(table)
    prio_all = np.zeros(n, np.uint64)
    keep = np.zeros(n, bool)
    band = np.full(n, -1, np.int32)
    pct = np.full(n, np.nan)
    prio_all[ok], keep[ok], band[ok], pct[ok] = prio, keep_ok, band_ok, pct_ok
    meta = dict(table.schema.metadata or {}) | {schema.META_SELECT_FINGERPRINT: task.fp.encode()}
    selection = {schema.PRIORITY: pa.array(prio_all, pa.uint64()), schema.PERCENTILE: pa.array(pct, pa.float64(), mask=~ok),
                 schema.KEEP: pa.array(keep), schema.BAND: pa.array(band, pa.int32())}
    scores = table
    at = scores.schema.get_field_index(schema.DISTANCE) + 1  # the assignment's columns, then the selection's, then an id column
    for offset, name in enumerate(schema.SELECTION_COLUMNS):
        scores = scores.add_column(at + offset, schema.SCORES_SCHEMA.field(name), selection[name])
    with task.out.open_atomic(schema.SCORES_DIR, schema.shard_file(shard)) as f:
        pq.write_table(scores.replace_schema_metadata(meta), f)
    return _counts(shard, table, ok, keep, band, meta)


def selected_with(fp: str, out: OutputDir, shard: str) -> bool:
    """The shard's scores are this selection's: its stamp, and not a file an older version's dedup
    rewrote (`META_LEGACY_CURATED_BY`: its statuses are not the assignment's and the removals')."""
    meta = file_metadata(out, schema.SCORES_DIR, shard)
    return meta.get(schema.META_SELECT_FINGERPRINT, b"").decode() == fp and schema.META_LEGACY_CURATED_BY not in meta


def count_selected(out: OutputDir, shard: str) -> ShardSelection:
    """The counts of a scores file already selected with this fingerprint (nothing rewritten)."""
    table = read_scores(out, shard, columns=[schema.STATUS, schema.KEEP, schema.BAND])
    ok = table.column(schema.STATUS).to_numpy(zero_copy_only=False) == schema.STATUS_OK
    keep = table.column(schema.KEEP).to_numpy(zero_copy_only=False)
    band = table.column(schema.BAND).to_numpy(zero_copy_only=False)
    return _counts(shard, table, ok, keep, band, table.schema.metadata or {})


def prototype_count(out: OutputDir) -> int:
    """k, from the prototypes' own record (the contract between the stages)."""
    return int(out.read_json(schema.PROTOTYPES_DIR, schema.KMEANS_META_FILE)["k"])


@STAGES.register
@dataclass
class SelectStage(Stage):
    """`scores/`: the assignment, the curation stages' removals and the selection, per shard."""

    name = "select"
    reads = ("assign", "prototypes")  # prototypes: k, and the centroids a dbp budget weighs clusters by
    reads_removals = True

    select: SelectConfig = field(default_factory=SelectConfig)
    write: WriteConfig = field(default_factory=WriteConfig)  # its band_step: the bands are cut here
    # ssl-prune extend: the parent run's output, whose recorded thresholds select the new samples
    parent: str = field(default="", metadata={"fingerprint": False})

    def identity(self, ctx: Context) -> tuple:
        if self.parent:
            meta = record.load_meta(OutputDir(self.parent))
            from ..parents import load_parent

            return ("parent", meta["fingerprint"] if meta else load_parent(self.parent).fingerprints["select"])
        return (self.select.fingerprinted(), self.write.band_step)

    def parent_record(self) -> record.SelectionRecord:
        """The thresholds the parent recorded; for a parent selected before select recorded them,
        the same cuts found again from its assignment and removals (its outputs only read)."""
        rec = record.load(OutputDir(self.parent))
        if rec is None:
            from ..parents import earlier_run, load_parent

            run = earlier_run(self.parent)
            pctx = Context(run.out, {s: "" for s in run.shards}, load_parent(self.parent).fingerprints["select"],
                           removals=run.removals)
            found, hist, plan, select, choice, _ = self.find_cuts(pctx)
            rec = record.SelectionRecord(found, hist, plan, {
                "fingerprint": pctx.fingerprint, "k": prototype_count(run.out), "edges": list(found.plan.edges),
                "select": select.model_dump(), "auto": choice.as_dict() if choice else None,
                "found_again_from_the_parents_outputs": True})
        return rec

    def edges(self) -> list[float]:
        return cuts.band_edges(self.select.keep_fraction, self.write.band_step)  # an extension's: its parent's config

    def tasks(self, ctx: Context, payload=None, strata=None, select: Optional[SelectConfig] = None) -> list[SelectTask]:
        select = select or self.select
        policy = None if select.is_auto else policy_class(select.policy)
        return [SelectTask(ctx.out, tuple(batch), select, policy, ctx.fingerprint, payload, ctx.removals, strata)
                for batch in batches(sorted(ctx.shards), TASKS_PER_CPU)]

    def choose(self, ctx: Context) -> Optional[auto.AutoChoice]:
        """select.policy auto: the rule for this pool (one pass over the assignment's distances)."""
        if not self.select.is_auto:
            return None
        hist = map_reduce(pass_tail, self.tasks(ctx), fold_sum, desc="select: auto rule")
        return auto.choose(hist, self.select.auto_tail_ratio)

    def strata(self, ctx: Context, n_groups: int, select: SelectConfig):
        """The groups' CCS strata when the policy uses them, else None."""
        if not policy_class(select.policy).uses_strata:
            return None
        hist = np.zeros((n_groups, DIST_BINS), np.int64)
        cuts.add_sparse(hist, map_reduce(pass_strata, self.tasks(ctx, select=select), cuts.fold_sparse,
                                         desc="select: strata"))
        return plan_strata(hist, select.strata, select.drop_hardest)

    def complete(self, ctx: Context) -> Optional[SelectStats]:
        if pending(ctx.out, ctx.shards, functools.partial(selected_with, ctx.fingerprint)):
            return None
        stats = SelectStats(self.edges())
        for res in per_shard(ctx.out, ctx.shards, count_selected).values():
            stats.add(res)
        if self.parent:  # what the parent's auto chose, as this extension recorded it
            stats.auto = (record.load_meta(ctx.out) or {}).get("auto")
        elif self.select.is_auto:  # a reused selection says what chose it: recorded with its cuts
            meta = record.load_meta(ctx.out)
            if meta is not None and meta.get("fingerprint") == ctx.fingerprint:
                stats.auto = meta.get("auto")
            else:  # selected by a version that kept no record: choose again (one pass)
                choice = self.choose(ctx)
                stats.auto = choice.as_dict() if choice else None
        return stats

    def run_with_parents_cuts(self, ctx: Context) -> SelectStats:
        """The parent's thresholds applied to the new samples' priorities: each gets the decision
        it would have got in the parent's run; `selection/` again, for an extension of this one."""
        rec = self.parent_record()
        select = SelectConfig(**rec.meta["select"])  # as the parent applied it (what auto chose included)
        strata = None if rec.strata is None else ray.put(rec.strata)
        stats = SelectStats(rec.edges, auto=rec.meta.get("auto"))
        shared = ray.put((rec.cuts, rec.hist))
        for results in run_tasks(pass_apply, self.tasks(ctx, shared, strata, select), desc="select: apply (parent's cuts)"):
            for res in results:
                stats.add(res)
        record.save(ctx.out, rec.cuts, rec.hist, rec.strata, rec.meta | {
            "fingerprint": ctx.fingerprint, "parent": {"output": self.parent, "fingerprint": rec.meta["fingerprint"]}})
        return stats

    def run(self, ctx: Context) -> SelectStats:
        if self.parent:
            return self.run_with_parents_cuts(ctx)
        found, hist, plan, select, choice, cost = self.find_cuts(ctx)
        stats = SelectStats(self.edges(), refine_passes=cost.refine_passes, boundary_values=cost.boundary_values,
                            auto=choice.as_dict() if choice else None)
        strata = None if plan is None else ray.put(plan)
        shared = ray.put((found, hist))  # shipped once, not per task
        for results in run_tasks(pass_apply, self.tasks(ctx, shared, strata, select), desc="select: apply"):
            for res in results:
                stats.add(res)
        # the thresholds, for samples that come later (ssl-prune extend)
        record.save(ctx.out, found, hist, plan, {"fingerprint": ctx.fingerprint, "k": prototype_count(ctx.out),
                                                 "edges": self.edges(), "select": select.model_dump(), "auto": stats.auto})
        return stats

    def find_cuts(self, ctx: Context):
        """The exact cuts of this selection over `ctx`'s shards -> (cuts, histogram, strata, the
        select settings as applied, what auto chose, the cut search's cost)."""
        choice = self.choose(ctx)
        select = self.select.resolved(choice) if choice else self.select
        if choice:
            log.info("select: policy auto -> %s rule: %s", choice.rule, choice.reason)
        k = prototype_count(ctx.out)
        spec = cuts.HistogramSpec.for_groups(k if select.balanced else 1)
        edges = self.edges()
        plan = self.strata(ctx, spec.n_groups, select)
        strata = None if plan is None else ray.put(plan)
        # every per-shard aggregate is reduced in tasks: the driver gets one result per pass
        hist_sparse, sums_sparse = map_reduce(pass_histogram, self.tasks(ctx, spec, strata, select), fold_histograms,
                                              desc="select: histograms")
        sums = dense_sums(sums_sparse, spec.n_groups)

        def n_keep(sizes: np.ndarray) -> np.ndarray:
            centroids = load_centroids(ctx.out) if select.balanced and select.budget == "dbp" else None
            return select.make_budget().allocate(sizes, edges, ClusterStats(sizes, sums, centroids), select.seed)

        cost = cuts.CutStats()
        found, hist = cuts.exact_cuts(
            spec, edges, [hist_sparse],
            lambda window: run_tasks(pass_boundary, self.tasks(ctx, ray.put(window), strata, select), desc="select: cut bins"),
            n_keep,
            refine=lambda step: [map_reduce(pass_refine, self.tasks(ctx, ray.put(step), strata, select), cuts.fold_sparse,
                                            desc="select: refine bins")],
            stats=cost,
        )
        return found, hist, plan, select, choice, cost
