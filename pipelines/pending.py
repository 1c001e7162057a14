"""Which shards' outputs are not done yet: the per-shard checks behind the stages' `complete()`.

On a local disk the driver reads the footers itself (fast, no task start-up); on object storage,
where each check costs requests of tens of milliseconds, Ray tasks check chunks of shards in
parallel, so a no-op re-run over 41k shards takes seconds, not an hour of serial requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from prune.io.storage import OutputDir, is_local
from prune.io.tables import file_metadata

from .runtime import run_tasks

CHUNK = 256  # shards one check task reads


@dataclass(frozen=True)
class _Chunk:
    out: OutputDir
    shards: tuple
    is_done: Callable[[OutputDir, str], bool]


def _check(chunk: _Chunk) -> list[str]:
    return [s for s in chunk.shards if not chunk.is_done(chunk.out, s)]


def pending(out: OutputDir, shards, is_done: Callable[[OutputDir, str], bool]) -> list[str]:
    """The shards (sorted) for which `is_done(out, shard)` is False; `is_done` must pickle
    (a module-level function, or a functools.partial of one)."""
    shards = sorted(shards)
    if is_local(out.fs):
        return [s for s in shards if not is_done(out, s)]
    chunks = [_Chunk(out, tuple(shards[i : i + CHUNK]), is_done) for i in range(0, len(shards), CHUNK)]
    return sorted(s for part in run_tasks(_check, chunks, desc="checking outputs") for s in part)


def stamped(directory: str, key: bytes, value: str, out: OutputDir, shard: str) -> bool:
    """The shard's Parquet file in `directory` carries `value` under `key` in its footer."""
    return file_metadata(out, directory, shard).get(key, b"").decode() == value
