"""Write stage: pruned shards in distance bands, with img2dataset metadata beside them.

Per input shard a task streams the tar once and sends kept samples to their band's fragment;
the driver plans output shards from the fragment counts alone; per output shard a task
concatenates its fragment slices. `sizes.json` and `bands.json` come last, then the stage
marker (`pruned/_stage.json`), so a set with a marker of this fingerprint is complete.

Ray retries a task whose node was lost. Every file here is written whole under its final name
(OutputDir.open_atomic: rename locally, one completed upload on S3), and the outputs are pure
functions of the selection: a retried fragment task finds its fragment file (written last) and
returns its counts, or rewrites its fragments byte for byte; a retried output task finds its tar
(written last) or rewrites the shard identically. No sample is lost or written twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import pyarrow.compute as pc

from prune import schema
from prune.io.settings import COPY_FROM_INPUT, COPY_FROM_STAGED, WriteConfig
from prune.io.storage import OutputDir
from prune.io.tables import read_scores
from prune.io.writer import (
    OutputShard,
    fragment_counts,
    plan_output_shards,
    write_fragments,
    write_output_shard,
)
from prune.select.cuts import band_edges
from prune.select.settings import BUDGET_PROPORTIONAL, SelectConfig

from ..parents import combine_with_parent
from ..pending import mark_done, marked_stats
from ..runtime import run_batched
from ..stage import STAGES, Context, Stage


@dataclass
class WriteStats:
    bands: list  # bands.json's list: per band its shards, counts and the brace pattern of the prefix
    output_shards: int
    samples_written: int


@dataclass(frozen=True)
class FragmentTask:
    out: OutputDir
    shard: str
    url: str
    staging: str
    stage_bytes: Optional[bool] = None  # None: by the input's storage (write.copy_from: auto)


@dataclass(frozen=True)
class OutputTask:
    out: OutputDir
    plan: OutputShard
    staging: str


def fragment_task(task: FragmentTask) -> dict:
    """One input shard -> its band fragments; skipped if a previous attempt finished it.
    -> {shard, counts: band -> samples, ok: the shard's ok samples}."""
    out, shard, staging = task.out, task.shard, task.staging
    table = read_scores(task.out, shard, columns=[schema.KEY, schema.STATUS, schema.KEEP, *schema.SCORE_COLUMNS_IN_PRUNED])
    n_ok = int(pc.sum(pc.equal(table.column(schema.STATUS), schema.STATUS_OK)).as_py() or 0)
    counts = fragment_counts(out, staging, shard)
    if counts is None:
        kept = table.filter(table.column(schema.KEEP))
        counts = write_fragments(task.url, shard, kept, out, staging, task.stage_bytes, expected=len(kept)).counts
    return {"shard": shard, "counts": {str(b): n for b, n in counts.items()}, "ok": n_ok}


@dataclass(frozen=True)
class Written:
    name: str  # the pruned shard's file name
    count: int  # samples in it
    band: int


def output_task(task: OutputTask) -> Written:
    if not task.out.exists(schema.PRUNED_DIR, task.plan.name):
        write_output_shard(task.out, task.staging, schema.PRUNED_DIR, task.plan)
    return Written(task.plan.name, task.plan.count, task.plan.band)


def bands_list(written: list[Written], edges: list[float], n_input_ok: int) -> list[dict]:
    """Per band: its shards, its samples, the cumulative count and the brace pattern of the prefix."""
    bands, cumulative = [], 0
    for b, edge in enumerate(edges):
        names = [w.name for w in written if w.band == b]
        n = sum(w.count for w in written if w.band == b)
        cumulative += n
        bands.append({
            "band": b,
            "keep_fraction": edge,
            "shards": names,
            "samples": n,
            "cumulative_samples": cumulative,
            "cumulative_fraction_of_ok": cumulative / n_input_ok if n_input_ok else 0.0,
            "prefix": f"{{{written[0].name[:-4]}..{names[-1][:-4]}}}.tar" if names else None,
        })
    return bands


@STAGES.register
@dataclass
class WriteStage(Stage):
    name = "write"
    reads_tars = True
    reads = ("select",)

    write: WriteConfig = field(default_factory=WriteConfig)
    # named in bands.json, its edges end the bands: its settings count in the selection's fingerprint
    select: SelectConfig = field(default_factory=SelectConfig, metadata={"fingerprint": False})
    # ssl-prune extend: the parent run's output (sizes.json and bands.json cover its shards too) and
    # its shard count (these are numbered after them)
    parent: str = field(default="", metadata={"fingerprint": False})
    first_shard: int = field(default=0, metadata={"fingerprint": False})

    def identity(self, ctx: Context) -> tuple:
        base = super().identity(ctx)
        return base + (("parent", self.parent, self.first_shard),) if self.parent else base

    def finish(self, out: OutputDir) -> None:
        """After sizes.json and bands.json, before the set is marked done: an extension's cover its parent's."""
        if self.parent:
            combine_with_parent(out, OutputDir(self.parent))

    def first_output_shard(self) -> int:
        """The number of the first pruned shard (an extension's follow its parent's)."""
        return self.first_shard

    def complete(self, ctx: Context) -> Optional[WriteStats]:
        if marked_stats(ctx.out, schema.PRUNED_DIR, ctx.fingerprint) is None:
            return None
        bands = ctx.out.read_json(schema.PRUNED_DIR, schema.BANDS_FILE)["bands"]
        return WriteStats(bands, sum(len(b["shards"]) for b in bands), sum(b["samples"] for b in bands))

    def run(self, ctx: Context) -> WriteStats:
        out, fp = ctx.out, ctx.fingerprint
        staging = f"{schema.STAGING_DIR}/write-{fp}"
        pending = f"{schema.PRUNED_DIR}/{schema.PENDING_MARKER}"
        if not (out.exists(pending) and out.read_json(pending).get("fingerprint") == fp):
            # shards of another selection must not mix with these: start the set afresh
            for name in out.listdir(schema.PRUNED_DIR):
                out.remove(schema.PRUNED_DIR, name)
            out.write_json({"fingerprint": fp}, pending)
        # else: an interrupted write of this very selection; its finished shards are kept
        counts: dict[tuple[int, str], int] = {}
        n_input_ok = 0
        stage_bytes = {COPY_FROM_INPUT: False, COPY_FROM_STAGED: True}.get(self.write.copy_from)
        tasks = [FragmentTask(out, s, ctx.shards[s], staging, stage_bytes) for s in sorted(ctx.shards)]
        for rec in run_batched(fragment_task, tasks, desc="write: fragments"):
            n_input_ok += rec["ok"]
            for band, n in rec["counts"].items():
                counts[(int(band), rec["shard"])] = n
        plans = plan_output_shards(counts, self.write.samples_per_shard, self.first_output_shard())
        written = sorted(
            run_batched(output_task, [OutputTask(out, p, staging) for p in plans], desc="write: shards"),
            key=lambda w: w.name,
        )
        out.write_json({w.name: w.count for w in written}, schema.PRUNED_DIR, schema.SIZES_FILE)
        bands = bands_list(written, band_edges(self.select.keep_fraction, self.write.band_step), n_input_ok)
        choice = getattr(ctx.earlier_stats.get("select"), "auto", None)  # select.policy auto: what it chose
        select = self.select.model_copy(update=choice["settings"]) if choice else self.select
        doc = {"policy": select.policy, "balanced": select.balanced,
               "keep_fraction": select.keep_fraction, "bands": bands}
        if select.balanced and select.budget != BUDGET_PROPORTIONAL:
            doc["budget"] = select.budget
        if choice:
            doc["auto"] = {"rule": choice["rule"], "reason": choice["reason"]}
        out.write_json(doc, schema.PRUNED_DIR, schema.BANDS_FILE)
        self.finish(out)
        out.remove(staging)
        mark_done(out, schema.PRUNED_DIR, fp)
        out.remove(pending)
        return WriteStats(bands, len(written), sum(w.count for w in written))
