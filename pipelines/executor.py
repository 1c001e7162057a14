"""The one executor: fingerprints, skip-if-complete, timing, logging and stats for a list of stages.

Every job (`run`, `evaluate`, `train-encoder`) is a list of stages handed to `execute`. For each
stage in order, the executor finds the stages whose outputs it reads (`dependencies`), computes its
fingerprint from its own settings and theirs (`stage_fingerprint`), asks the stage whether its
outputs are complete with that fingerprint, runs it if not, and records its stats and wall time.
A change of settings thus re-runs the stage and what reads it, nothing else. For a `ShardStage`,
its per-shard part (pipelines/shard_stage.py) owns the work too: which shards are done, the tasks,
their batching, retries and progress bar. Other stages keep their own resume scheme (parquet
metadata, a JSON record, a marker file) behind `complete()`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from prune import schema
from prune.io.storage import OutputDir
from prune.settings import fingerprint

from . import runtime
from .stage import Context, Stage, check_order

log = logging.getLogger("ssl_prune")

_PACKAGES = ("ray", "torch", "open_clip_torch", "faiss-cpu", "pyarrow", "webdataset", "numpy", "pillow")


def stage_fingerprint(stage: Stage, upstream, ctx: Context) -> str:
    """Hash of the stage's tag, the fingerprints of the stages it reads (`upstream`: one, or a list
    in the job's order; none for a first stage) and its settings. A stage whose identity is None and
    that reads one stage passes that one's fingerprint through."""
    ups = [upstream] if isinstance(upstream, str) else list(upstream)
    ups = [u for u in ups if u]
    parts = stage.identity(ctx)
    if parts is None:
        return ups[0] if len(ups) == 1 else fingerprint(stage.fingerprint_tag or stage.name, *ups)
    return fingerprint(stage.fingerprint_tag or stage.name, *ups, *parts)


def _split(stage: Stage) -> str:
    return getattr(stage, "split", "")


def dependencies(stages: list[Stage]) -> list[list[int]]:
    """Per stage, the positions of the stages whose outputs it reads, in the job's order: for each
    name it `reads`, the last stage before it on its split that is or provides it; for a curation
    stage or select, every curation stage before it. A stage already read through another one
    (prototypes, through assign) is left out: its fingerprint is in that one's, and leaving it out
    keeps a chain of stages hashing as it did when each read only the one before."""
    direct: list[list[int]] = []
    behind: list[set] = []  # per stage: every stage its outputs depend on, however far back
    for i, stage in enumerate(stages):
        earlier = [j for j in range(i) if _split(stages[j]) == _split(stage)]
        deps = set()
        for name in stage.reads:
            found = [j for j in earlier if stages[j].name == name or name in stages[j].provides]
            deps.add(found[-1])  # there is one: `check_order` ran first
        if stage.removes or stage.reads_removals:
            deps |= {j for j in earlier if stages[j].removes}
        behind.append(set().union(*({j} | behind[j] for j in deps)) if deps else set())
        direct.append(sorted(j for j in deps if not any(j in behind[d] for d in deps if d != j)))
    return direct


@dataclass
class Executed:
    """What `execute` did: per stage (by label), its stats, fingerprint, wall time and whether reused."""

    stats: dict[str, Any] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    reused: dict[str, bool] = field(default_factory=dict)

    def stats_dict(self) -> dict:
        """Per stage its stats, and `reused`: whether its outputs were complete (the executor's word)."""
        return {name: as_dict(s) | {"reused": self.reused[name]} for name, s in self.stats.items()}


def as_dict(stats) -> dict:
    """A stats dataclass (or a plain dict) -> JSON-able dict."""
    return dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else dict(stats)


def preflight(stages: list[Stage]) -> None:
    """Every stage's own checks, before any work (jobs call this before they list their input)."""
    for stage in stages:
        stage.setup()


def execute(stages: list[Stage], ctx: Context, checked: bool = False,
            on_stage_done: Optional[Callable[[str, dict], None]] = None) -> Executed:
    """Run every stage whose outputs are not complete, in order; see the module docstring.
    `checked`: the caller ran `preflight(stages)` already (before listing its input).
    `on_stage_done(label, stats by label)`: called after each stage, run or reused."""
    if not checked:
        preflight(stages)
    for split in dict.fromkeys(_split(s) for s in stages):  # no order that writes a removed sample
        check_order([s for s in stages if _split(s) == split])
    done = Executed()
    reads = dependencies(stages)
    fps: list[str] = []
    for i, stage in enumerate(stages):
        split = _split(stage)
        removals = tuple(s.name for s in stages[:i] if s.removes and _split(s) == split)
        sctx = dataclasses.replace(ctx.split(split), earlier_fingerprints=dict(done.fingerprints),
                                   earlier_stats=dict(done.stats),
                                   removals=removals if stage.removes or stage.reads_removals else ())
        sctx.fingerprint = stage_fingerprint(stage, [fps[j] for j in reads[i]], sctx)
        fps.append(sctx.fingerprint)
        t0 = time.time()
        stats = stage.complete(sctx)
        reused = stats is not None
        if not reused:
            how = runtime.ensure()  # Ray starts with the first stage that has work
            sctx.ray = sctx.ray or how
            with runtime.stage_progress(stage.label):
                stats = stage.run(sctx)
        label = stage.label
        done.stats[label], done.fingerprints[label], done.reused[label] = stats, sctx.fingerprint, reused
        done.timings_s[label] = round(time.time() - t0, 3)
        log.info("stage %s: %s in %.1f s", label, tally(stats, reused, len(sctx.shards)), done.timings_s[label])
        if on_stage_done is not None:
            on_stage_done(label, done.stats)
    return done


def tally(stats, reused: bool, shards: int) -> str:
    """The console's word on a stage: how many of its shards it computed and how many it reused
    (a stage's stats say `shards_reused` when it can reuse part of its outputs)."""
    if not shards:
        return "complete, reused" if reused else "computed"
    kept = shards if reused else min(shards, int(getattr(stats, "shards_reused", 0) or 0))
    return f"{shards - kept} shards computed, {kept} reused"


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def outputs_list(out: OutputDir) -> list[str]:
    """Every output file, one directory deep (whatever stages made them); scratch and the manifest left out."""
    files = []
    for d in out.listdir():
        if d.startswith((".", "_")) or d == schema.MANIFEST:
            continue
        if out.fs.isdir(out.path(d)):
            files += [f"{d}/{n}" for n in out.listdir(d) if not n.startswith(".")]
        else:
            files.append(d)
    return files


def write_manifest(out: OutputDir, done: Executed, total_s: float, **fields) -> dict:
    """manifest.json, written last and atomically: its presence means the job completed."""
    manifest = {
        "tool": "ssl-prune",
        **fields,
        "versions": package_versions(),
        "stages": done.stats_dict(),
        "fingerprints": done.fingerprints,
        "timings_s": done.timings_s | {"total": round(total_s, 3)},
        "outputs": outputs_list(out),
    }
    out.write_json(manifest, schema.MANIFEST)
    return manifest
