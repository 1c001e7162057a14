"""Stages whose work is one function per input shard, and the executor's part that runs them.

A `ShardStage` declares what it reads (`reads`), where it writes (`directory()`: one Parquet file
per shard, stamped with the stage's fingerprint in its footer), how to tell a shard is done
(`done_check`: that stamp), its resources, and `process_shard`. `run_shards` does the rest: the
shards not done yet, batched into Ray tasks (or one a task), retried by Ray when a node is lost,
on the stage's progress bar, and the stats summed from per-shard counts. A curation stage
(`removes = True`) writes `removals/<name>/NNNNN.parquet`: one row per sample it removed, the key
and the reason first. Model: datatrove's executor over blocks, NeMo Curator's stage classes.
"""

from __future__ import annotations

import functools
from abc import abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from prune import schema
from prune.io.storage import OutputDir
from prune.io.tables import write_removals

from . import runtime
from .pending import per_shard, stamped
from .stage import Context, Stage


@dataclass(frozen=True)
class ShardJob:
    """One shard of a ShardStage's work, as its task sees it."""

    out: OutputDir
    shard: str
    url: str  # the input tar
    fingerprint: str  # the stage's: stamp the output with it
    removals: tuple[str, ...] = ()  # the curation stages before it (a curation stage skips what they removed)


@dataclass
class ShardStats:
    """What a ShardStage did: shards computed and reused, and its per-shard counts summed."""

    shards_computed: int = 0
    shards_reused: int = 0
    totals: dict = field(default_factory=dict)

    @classmethod
    def of(cls, computed: dict, reused: dict) -> "ShardStats":
        total: Counter = Counter()
        for counts in (*computed.values(), *reused.values()):
            total.update(counts)
        return cls(len(computed), len(reused), dict(sorted(total.items())))


class ShardStage(Stage):
    """A stage whose work is one function per input shard; see the module docstring."""

    output_dir: ClassVar[str] = ""  # default: removals/<name> for a curation stage, else <name>
    stamp_key: ClassVar[Optional[bytes]] = None  # the footer key of the stamp (default by kind)
    shards_per_task: ClassVar[int] = 0  # 0: consecutive shards batched, a few tasks per CPU; n: n a task

    def directory(self) -> str:
        return self.output_dir or (schema.removals_dir(self.name) if self.removes else self.name)

    def stamp(self) -> bytes:
        return self.stamp_key or (schema.META_REMOVALS_FINGERPRINT if self.removes else schema.META_STAGE_FINGERPRINT)

    def done_check(self, ctx: Context) -> Callable[[OutputDir, str], bool]:
        """Whether a shard's output is complete with this fingerprint (it must pickle)."""
        return functools.partial(stamped, self.directory(), self.stamp(), ctx.fingerprint)

    def max_in_flight(self) -> Optional[int]:
        """Tasks in flight at most; None: by the cluster's CPUs (runtime.run_tasks)."""
        return None

    @abstractmethod
    def process_shard(self, job: ShardJob) -> dict:
        """One shard's output, written atomically and stamped (`write_shard`); runs in a Ray task.
        -> small per-shard counts (name -> int), summed into the stage's stats."""

    def write_shard(self, job: ShardJob, table: pa.Table) -> None:
        """A shard's output, stamped with the stage's fingerprint, in one atomic write."""
        if self.removes:
            write_removals(job.out, self.name, job.shard, table, job.fingerprint)
            return
        meta = dict(table.schema.metadata or {}) | {self.stamp(): job.fingerprint.encode()}
        with job.out.open_atomic(self.directory(), schema.shard_file(job.shard)) as f:
            pq.write_table(table.replace_schema_metadata(meta), f)

    def shard_counts(self, out: OutputDir, shard: str) -> dict:
        """The counts of a shard an earlier run finished (from its output); by default none."""
        return {}

    def summarize(self, computed: dict[str, dict], reused: dict[str, dict]) -> Any:
        """The stage's stats from the per-shard counts of the shards computed and reused."""
        return ShardStats.of(computed, reused)

    def complete(self, ctx: Context) -> Optional[Any]:
        return shards_complete(self, ctx)

    def run(self, ctx: Context) -> Any:
        return run_shards(self, ctx)


def shards_complete(stage: ShardStage, ctx: Context) -> Optional[Any]:
    """A ShardStage's stats when every shard's output carries this fingerprint, else None."""
    done = per_shard(ctx.out, ctx.shards, stage.done_check(ctx))
    if not all(done.values()):
        return None
    return stage.summarize({}, per_shard(ctx.out, ctx.shards, stage.shard_counts))


def _shard_task(work: tuple) -> dict:
    """One task of a ShardStage: its shards one after the other -> shard -> counts."""
    stage, jobs = work
    return {job.shard: stage.process_shard(job) for job in jobs}


def run_shards(stage: ShardStage, ctx: Context) -> Any:
    """A ShardStage's shards not done yet, in Ray tasks (one shard a task, or consecutive shards
    batched: `shards_per_task`), on the stage's own progress bar; a task lost with its node is
    run again by Ray. -> the stage's stats over every shard, the ones done before included."""
    done = per_shard(ctx.out, ctx.shards, stage.done_check(ctx))
    jobs = [ShardJob(ctx.out, s, ctx.shards[s], ctx.fingerprint, ctx.removals) for s, ok in done.items() if not ok]
    n = stage.shards_per_task
    groups = runtime.batches(jobs) if n == 0 else [jobs[i : i + n] for i in range(0, len(jobs), n)]
    computed: dict[str, dict] = {}
    for part in runtime.run_tasks(_shard_task, [(stage, g) for g in groups], desc=f"{stage.name}: shards",
                                  max_in_flight=stage.max_in_flight(), name=f"{stage.name}_shard",
                                  **stage.resources(ctx).ray_args()):
        computed |= part
    reused = per_shard(ctx.out, [s for s, ok in done.items() if ok], stage.shard_counts)
    return stage.summarize(computed, reused)
