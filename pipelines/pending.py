"""Which shards' outputs are not done yet: the per-shard checks behind the stages' `complete()`.

On a local disk the driver reads the footers itself (fast, no task start-up); on object storage,
where each check costs requests of tens of milliseconds, Ray tasks check chunks of shards in
parallel, so a no-op re-run over 41k shards takes seconds, not an hour of serial requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from prune.io.storage import OutputDir, is_local
from prune.io.tables import file_footer, file_metadata
from prune.schema import STAGE_MARKER

from .runtime import run_tasks

CHUNK = 256  # shards one check task reads


@dataclass(frozen=True)
class _Chunk:
    out: OutputDir
    shards: tuple
    fn: Callable[[OutputDir, str], Any]


def _apply(chunk: _Chunk) -> dict:
    return {s: chunk.fn(chunk.out, s) for s in chunk.shards}


def per_shard(out: OutputDir, shards, fn: Callable[[OutputDir, str], Any]) -> dict[str, Any]:
    """shard -> `fn(out, shard)` for every shard (in shard order); `fn` must pickle (a module-level
    function, or a functools.partial of one) and return something small."""
    shards = sorted(shards)
    if is_local(out.fs):
        return {s: fn(out, s) for s in shards}
    chunks = [_Chunk(out, tuple(shards[i : i + CHUNK]), fn) for i in range(0, len(shards), CHUNK)]
    found = {}
    for part in run_tasks(_apply, chunks, desc="checking outputs"):
        found |= part
    return {s: found[s] for s in shards}


def pending(out: OutputDir, shards, is_done: Callable[[OutputDir, str], bool]) -> list[str]:
    """The shards (sorted) for which `is_done(out, shard)` is False."""
    return [s for s, done in per_shard(out, shards, is_done).items() if not done]


def marked_stats(out: OutputDir, directory: str, fp: str) -> dict | None:
    """The stats a stage recorded in `directory/_stage.json` when it finished with fingerprint `fp`
    (None: no marker, or another fingerprint's): a stage's record that its whole set is done."""
    marker = f"{directory}/{STAGE_MARKER}"
    if not out.exists(marker):
        return None
    record = out.read_json(marker)
    return record.get("stats", {}) if record.get("fingerprint") == fp else None


def mark_done(out: OutputDir, directory: str, fp: str, stats: dict | None = None) -> None:
    """Written last by a stage: its set in `directory` is complete for fingerprint `fp`."""
    out.write_json({"fingerprint": fp} | ({"stats": stats} if stats is not None else {}), f"{directory}/{STAGE_MARKER}")


def footer(directory: str, out: OutputDir, shard: str) -> tuple[dict, int]:
    """The shard's Parquet file in `directory`: (schema metadata, row count), from its footer."""
    return file_footer(out, directory, shard)


def stamped(directory: str, key: bytes, value: str, out: OutputDir, shard: str) -> bool:
    """The shard's Parquet file in `directory` carries `value` under `key` in its footer."""
    return file_metadata(out, directory, shard).get(key, b"").decode() == value
