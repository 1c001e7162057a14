"""The stage protocol: one small class per stage, knowing nothing about where it runs.

A stage is a dataclass whose fields are its settings (config sections named as the fields, e.g.
`embed: EmbedConfig`), registered by name with `@STAGES.register`. It declares

- `reads`: the stages whose outputs it reads (`removes` and `reads_removals`: the curation stages'
  removals). The order of a job's list is checked by them (`check_order`), and the executor hashes
  the fingerprints of exactly those stages into this one's, so a change reaches only what reads it;
- `identity(ctx)`: the settings its outputs depend on: by default each section's settings that count
  (`Section.fingerprinted`: which count is declared beside each setting, prune/settings.py);
- `resources(ctx)`: what one of its Ray tasks or actors asks for;
- `setup()`: checks on the driver before any work, input listing included (weights on this machine);
- `complete(ctx)`: the stats of its outputs when they all exist with `ctx.fingerprint`, else None;
- `run(ctx)`: does the work (skipping per-shard outputs already complete) and returns typed stats.

Each stage owns its outputs: no stage rewrites a file another wrote. A stage whose work is one
function per shard is a `ShardStage` (pipelines/shard_stage.py): it declares its output directory
and per-shard function, and the executor's per-shard part does the skipping, the task batching,
the retries and the progress bar.

Stages pass data only through the output directory's data contract (prune/schema.py): what one
writes, the next reads. That is what lets any stage be re-run alone. The context also carries the
fingerprints and stats of the stages before (for a stage that depends on several, as evaluate on
both splits' embeddings, and for its records), never data.
Model: datatrove's PipelineStep (one block, any executor) and NeMo Curator's processing stages
(settings as fields, declared resources, setup once).
"""

from __future__ import annotations

import dataclasses
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from prune.io.storage import OutputDir
from prune.settings import Registry, Section


@dataclass(frozen=True)
class Resources:
    """What one task or actor of a stage asks Ray for."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: Optional[int] = None  # bytes; None: no reservation

    def ray_args(self) -> dict:
        args = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            args["num_gpus"] = self.num_gpus
        if self.memory:
            args["memory"] = self.memory
        return args


@dataclass
class Context:
    """What a stage runs on: the output root, the input shards, and its own fingerprint."""

    out: OutputDir
    shards: dict[str, str]  # shard id -> input URL, for this run (or this split)
    fingerprint: str = ""  # this stage's, set by the executor before complete() and run()
    splits: dict[str, "Context"] = field(default_factory=dict)  # named sub-runs (evaluate: train, test)
    ray: str = ""  # how the job joined Ray (runtime.connect), for the records
    # set by the executor for a curation stage and for select: the curation stages before it, in
    # order, whose removals (removals/<name>/) it reads
    removals: tuple[str, ...] = ()
    # set by the executor: the fingerprints and stats of the stages before this one, by label; for
    # a stage that depends on several (evaluate on both splits' embeddings) and for reports
    earlier_fingerprints: dict[str, str] = field(default_factory=dict)
    earlier_stats: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> "Context":
        """The context of a named split ("" is this one)."""
        return self if not name else self.splits[name]


class Stage(ABC):
    """One step of a job. Subclasses are dataclasses; see the module docstring."""

    name: ClassVar[str]
    fingerprint_tag: ClassVar[Optional[str]] = None  # the tag hashed into the fingerprint (default: name)
    # stages whose outputs this one reads: a job's list must name them before it (their
    # fingerprints then flow into this one's, so stale inputs are never taken for current ones)
    reads: ClassVar[tuple[str, ...]] = ()
    # stages whose outputs this one also makes (an import of precomputed embeddings makes what
    # embed makes): a later stage's `reads` is met by either
    provides: ClassVar[tuple[str, ...]] = ()
    reads_tars: ClassVar[bool] = False  # reads the job's input tar shards (a run without `input` cannot have it)
    # a curation stage: writes only its own removals (removals/<name>/, each with its reason) and
    # looks only at the samples the curation stages before it left
    removes: ClassVar[bool] = False
    # reads every curation stage's removals (select): each must come before it in the list
    reads_removals: ClassVar[bool] = False

    def input_shards(self) -> Optional[dict[str, str]]:
        """The units of work when this stage brings its own input (the first stage only), as shard
        id -> URL; None: the job's `input` shards."""
        return None

    def identity(self, ctx: Context) -> Optional[tuple]:
        """The settings (and inputs) the outputs depend on; None: the outputs are fully determined
        by what the stage reads (with one such stage, its fingerprint passes through). By default
        every field: of a section, its settings that count; a field whose metadata says
        `fingerprint=False` is read for the records only (its settings count where they act)."""
        return tuple(value.fingerprinted() if isinstance(value, Section) else value
                     for f in dataclasses.fields(self) if f.init and f.metadata.get("fingerprint", True)
                     for value in [getattr(self, f.name)])

    def resources(self, ctx: Context) -> Resources:
        return Resources()

    def setup(self) -> None:
        """Checks on the driver before any work of the job (before its input is even listed)."""

    @abstractmethod
    def complete(self, ctx: Context) -> Optional[Any]:
        """The stats of the outputs when they all exist with `ctx.fingerprint`; None otherwise."""

    @abstractmethod
    def run(self, ctx: Context) -> Any:
        """Make the outputs (reusing what is complete); return typed stats (a dataclass)."""

    @property
    def label(self) -> str:
        """The stage's name in logs, timings and the manifest (a split stage adds its split)."""
        split = getattr(self, "split", "")
        return f"{self.name}:{split}" if split else self.name

    @classmethod
    def sections(cls) -> dict[str, tuple[type, Any]]:
        """Config sections this stage reads: field name -> (settings model, default)."""
        hints = typing.get_type_hints(cls)
        out = {}
        for f in dataclasses.fields(cls):
            t = hints.get(f.name)
            if isinstance(t, type) and issubclass(t, Section):
                if f.default is not dataclasses.MISSING:
                    default = f.default
                elif f.default_factory is not dataclasses.MISSING:
                    default = f.default_factory()
                else:
                    default = ...  # a section the config must give
                out[f.name] = (t, default)
        return out

    @classmethod
    def from_config(cls, cfg) -> "Stage":
        """This stage with its fields taken from the config's keys of the same names."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(cfg, f.name)})


STAGES: Registry[type[Stage]] = Registry("stage")


def check_order(stages: list) -> None:
    """A job's stage list (stage classes or instances, of one split), checked by what each stage
    reads: every stage it reads comes earlier, and every curation stage comes before the stages
    that read all removals (select), so no order can write a sample a curation stage removed.
    ValueError says what is wrong and the list that works. The config checks it when it is
    loaded, and the executor again before any work (a list built in Python)."""
    names = [s.name for s in stages]
    for i, (name, stage) in enumerate(zip(names, stages)):
        if name in names[:i]:
            raise ValueError(f"stage {name!r} is listed twice")
        before = {n for earlier in stages[:i] for n in (earlier.name, *earlier.provides)}
        missing = [r for r in stage.reads if r not in before]
        if missing:
            raise ValueError(f"stage {name!r} needs {', '.join(repr(m) for m in missing)} before it in the list")
    for i, (name, stage) in enumerate(zip(names, stages)):
        if not stage.reads_removals:
            continue
        late = [s.name for s in stages[i + 1:] if s.removes]
        if late:
            fixed = [n for n in names[:i] if n not in late] + late + [n for n in names[i:] if n not in late]
            raise ValueError(f"curation stage {late[0]!r} comes after {name!r}, which selects from the removals of the "
                             f"curation stages before it: its removals would reach neither the selection nor the pruned "
                             f"shards; list it before {name!r}: stages=[{', '.join(fixed)}]")
