"""Import stage: precomputed embeddings (clip-retrieval's output, or Parquet with a key and an
embedding column) written as the embed stage's output, so a run starts at prototypes.

It brings its own units of work (one per embeddings file, `input_shards`) and `provides` embed,
so `stages=[import, prototypes, assign, select, export]` needs no tar shards at all: scores and
id exports work without them (the columns it carries, e.g. url and uid, go to `imported/` for
export). Per part a task writes `embeddings/NNNNN.parquet` (unit-norm float16; a row with NaN/inf
or zero norm gets status `invalid_embedding`) stamped with this stage's fingerprint.

With `input` as well, the units of work are the tar shards and the rows are joined back to them by
key (import_join.py), so `write` can copy the kept samples.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import ray

from prune import schema
from prune.io.embeddings_in import ImportConfig, list_parts, normalized, probe_dim, read_part, with_scores
from prune.io.key_ranges import KeyRanges, KeysSayNoShard
from prune.io.storage import InputError, OutputDir
from prune.settings import ConfigError

from ..import_join import AlignTask, KeysTask, RouteTask, align_shard, route_part, shard_range, write_imported
from ..pending import mark_done, marked_stats, pending, stamped
from ..runtime import run_tasks
from ..stage import STAGES, Context, Stage


@dataclass
class ImportStats:
    parts: int = 0
    samples: int = 0
    invalid: int = 0  # rows with no direction (NaN/inf or zero norm)
    dim: int = 0
    joined: bool = False  # rows joined back to the input's tar shards by key
    missing: int = 0  # joined: tar samples no imported row has the key of
    unmatched: int = 0  # joined: imported rows no tar sample has the key of (or a second row of one)
    shard_failures: dict = field(default_factory=dict)  # joined: shard -> why its tar gave no sample
    with_caption: int = 0  # samples whose caption's embedding came along (their clip score is recorded)


@dataclass(frozen=True)
class ImportTask:
    out: OutputDir
    shard: str
    url: str
    settings: ImportConfig
    fp: str
    model_id: str
    dim: int  # the same for every part, also one whose rows all failed upstream


def import_part(task: ImportTask) -> dict:
    """One embeddings file -> embeddings/NNNNN.parquet (and imported/NNNNN.parquet)."""
    keys, vectors, carried, text = read_part(task.settings, task.url)
    dim = task.dim
    if vectors.shape[1] not in (0, dim):
        raise ValueError(f"{task.url}: embeddings of dimension {vectors.shape[1]}, the others' is {dim}")
    unit, ok = normalized(vectors if vectors.shape[1] else np.full((len(keys), dim), np.nan, np.float32))
    status = np.where(ok, schema.STATUS_OK, schema.STATUS_BAD_EMBEDDING)
    scored = with_scores(unit, ok, text)
    write_imported(task.out, task.shard, task.url, task.fp, task.model_id, pa.array(keys, pa.string()), unit, ok,
                   status, carried, text=scored)
    return {"samples": len(keys), "invalid": int((~ok).sum()), "dim": dim,
            "with_caption": int((~np.isnan(scored[2])).sum()) if scored is not None else 0}


@STAGES.register
@dataclass
class ImportStage(Stage):
    name = "import"
    provides = ("embed",)

    import_embeddings: ImportConfig = field(default_factory=ImportConfig)

    def setup(self) -> None:
        if not self.import_embeddings.path:
            raise ConfigError("missing config key 'import_embeddings.path': the stage list names 'import'")

    @property
    def model_id(self) -> str:
        return f"imported:{self.import_embeddings.format}:{self.import_embeddings.path.rstrip('/')}"

    def input_shards(self) -> dict[str, str]:
        return list_parts(self.import_embeddings)

    def identity(self, ctx: Context) -> tuple:
        return (self.import_embeddings.fingerprinted(), sorted(ctx.shards.items()))

    def complete(self, ctx: Context) -> Optional[ImportStats]:
        recorded = marked_stats(ctx.out, schema.EMBEDDINGS_DIR, ctx.fingerprint)
        is_done = functools.partial(stamped, schema.EMBEDDINGS_DIR, schema.META_EMBED_FINGERPRINT, ctx.fingerprint)
        if recorded is None or pending(ctx.out, ctx.shards, is_done):
            return None
        return ImportStats(**recorded)

    def run(self, ctx: Context) -> ImportStats:
        parts = list_parts(self.import_embeddings)
        if ctx.shards != parts:  # the run's input: tar shards to join the rows back to
            stats = self.join(ctx, parts)
            mark_done(ctx.out, schema.EMBEDDINGS_DIR, ctx.fingerprint, stats.__dict__)
            return stats
        dim = probe_dim(self.import_embeddings, ctx.shards)
        tasks = [ImportTask(ctx.out, s, url, self.import_embeddings, ctx.fingerprint, self.model_id, dim)
                 for s, url in sorted(ctx.shards.items())]
        stats = ImportStats(parts=len(tasks))
        for rec in run_tasks(import_part, tasks, desc="import: embeddings"):
            stats.samples += rec["samples"]
            stats.invalid += rec["invalid"]
            stats.with_caption += rec["with_caption"]
            stats.dim = stats.dim or rec["dim"]
        mark_done(ctx.out, schema.EMBEDDINGS_DIR, ctx.fingerprint, stats.__dict__)
        return stats

    def join(self, ctx: Context, parts: dict[str, str]) -> ImportStats:
        """The three passes of import_join.py: key ranges, rows routed by range, aligned per shard."""
        dim = probe_dim(self.import_embeddings, parts)
        stats = ImportStats(parts=len(parts), dim=dim, joined=True)
        ranges = {}
        staging = f"{schema.STAGING_DIR}/import-{ctx.fingerprint}"
        listed = [KeysTask(ctx.out, s, u, staging) for s, u in sorted(ctx.shards.items())]
        for rec in run_tasks(shard_range, listed, desc="import: keys"):
            if "error" in rec:
                stats.shard_failures[rec["shard"]] = rec["error"]
            else:
                ranges[rec["shard"]] = (rec["first"], rec["last"])
        index = KeyRanges.of(ranges)
        shared = ray.put(index)
        by_shard: dict[int, list] = {}
        routed = [RouteTask(ctx.out, p, url, self.import_embeddings, shared, staging) for p, url in sorted(parts.items())]
        try:
            routed_parts = list(run_tasks(route_part, routed, desc="import: route rows"))
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, KeysSayNoShard):
                raise InputError(f"import_embeddings with input: {exc.cause}") from None
            raise
        imported_rows = 0
        with_text = any(rec["text"] for rec in routed_parts)
        for rec in routed_parts:
            imported_rows += rec["rows"]
            for i in rec["shards"]:
                by_shard.setdefault(i, []).append(rec["part"])
        position = {s: i for i, s in enumerate(index.shards)}
        aligned = [AlignTask(ctx.out, s, position.get(s, -1), url, tuple(sorted(by_shard.get(position.get(s, -1), []))),
                             staging, ctx.fingerprint, self.model_id, dim, stats.shard_failures.get(s, ""), with_text)
                   for s, url in sorted(ctx.shards.items())]
        for rec in run_tasks(align_shard, aligned, desc="import: align to shards"):
            stats.samples += rec["samples"]
            stats.invalid += rec["invalid"]
            stats.missing += rec["missing"]
            stats.with_caption += rec["with_caption"]
            imported_rows -= rec["matched"]
        stats.unmatched = imported_rows
        ctx.out.remove(staging)
        return stats
