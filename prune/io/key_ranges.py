"""Which input shards may hold a key: img2dataset's keys are ranges per shard.

img2dataset names a sample `{shard}{index}` with fixed widths (`000030017` is sample 17 of shard
00003), so each shard's keys form a range disjoint from the others'. Embeddings computed elsewhere
(clip-retrieval, NeMo Curator) keep those keys; joining them back to the tar shards then needs each
shard's first and last key only, not a shuffle of every key: a part of embeddings is routed to the
shards whose range holds each key, by binary search. A few overlapping ranges (a shard copied under
another name) only send a row to each candidate, where the exact key decides; keys that say nothing
of their shard (random ids) would send every row everywhere, and are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_FAN_OUT = 4.0  # routed rows per row, on average, beyond which keys are taken not to say their shard


class KeysSayNoShard(ValueError):
    """The shards' key ranges overlap so much that routing by range is no better than a broadcast."""


@dataclass(frozen=True)
class KeyRanges:
    """[first, last] key ranges, one per shard."""

    shards: tuple[str, ...]
    first: np.ndarray  # str keys
    last: np.ndarray

    @classmethod
    def of(cls, ranges: dict[str, tuple[str, str]]) -> "KeyRanges":
        """shard -> (first key, last key) of its keys (empty shards left out)."""
        items = sorted(ranges.items())
        return cls(tuple(s for s, _ in items), np.array([r[0] for _, r in items], dtype=str),
                   np.array([r[1] for _, r in items], dtype=str))

    def route(self, keys) -> tuple[np.ndarray, np.ndarray]:
        """(row, shard index) for every shard range holding each key, grouped by shard; a key in
        no range appears in no pair."""
        keys = np.asarray(keys, dtype=str)
        order = np.argsort(keys, kind="stable")
        ordered = keys[order]
        lo = np.searchsorted(ordered, self.first, side="left")
        hi = np.searchsorted(ordered, self.last, side="right")
        counts = np.maximum(hi - lo, 0)
        if counts.sum() > MAX_FAN_OUT * max(len(keys), 1):
            raise KeysSayNoShard(f"the input shards' key ranges overlap: a key would go to {counts.sum() / len(keys):.1f} "
                                 f"shards on average (keys must say their shard, as img2dataset's do)")
        shard = np.repeat(np.arange(len(self.shards)), counts)
        starts = np.repeat(lo - np.cumsum(counts) + counts, counts)
        rows = order[starts + np.arange(counts.sum())] if counts.sum() else np.zeros(0, np.int64)
        return rows, shard
