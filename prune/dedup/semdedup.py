"""SemDeDup inside one cluster, in blocks of bounded memory.

Members are put in keep order (farthest from the prototype first, by default, as the paper does);
a member is a near-duplicate when its cosine similarity to any member before it exceeds
1 - eps. That is the paper's rule (the column maxima of the upper triangle of the similarity
matrix), so of every group of near-copies exactly the first in keep order survives. The matrix is
never formed: each block of `block_rows` members is compared with every member before it, so
memory is O(n x block_rows) for a cluster of n, whatever n is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prune.dedup.settings import KEEP_FARTHEST, KEEP_NEAREST, KEEP_RANDOM
from prune.select.policies import seeded_hash


@dataclass
class ClusterDedup:
    """Per member, in the order given: removed or not, and whom it duplicates (-1: kept)."""

    removed: np.ndarray  # bool [n]
    duplicate_of: np.ndarray  # int64 [n]: index (in the given order) of the most similar earlier member
    similarity: np.ndarray  # float32 [n]: that similarity (NaN for kept members)


def _tiebreak(seed: int, shards, keys) -> np.ndarray:
    """The selection's seeded 64-bit hash of (shard, key), vectorized per shard: the deterministic
    order among equal distances, and the order itself for `keep: random`."""
    shards, keys = np.asarray(shards), np.asarray(keys)
    out = np.empty(len(keys), np.uint64)
    for shard in np.unique(shards):
        rows = np.nonzero(shards == shard)[0]
        out[rows] = seeded_hash(seed, str(shard), [str(k) for k in keys[rows]], b"dedup")
    return out


def keep_order(distance: np.ndarray, shards, keys, keep: str, seed: int) -> np.ndarray:
    """The members' order of precedence: the first of a group of near-copies is the one kept."""
    tie = _tiebreak(seed, shards, keys)
    d = np.asarray(distance, np.float64)
    if keep == KEEP_FARTHEST:
        return np.lexsort((tie, -d))
    if keep == KEEP_NEAREST:
        return np.lexsort((tie, d))
    if keep == KEEP_RANDOM:
        return np.argsort(tie, kind="stable")
    raise ValueError(f"dedup.keep {keep!r}: expected {KEEP_FARTHEST}, {KEEP_NEAREST} or {KEEP_RANDOM}")


def dedup_ordered(x: np.ndarray, eps: float, block_rows: int = 512, first: int = 1) -> ClusterDedup:
    """Members `x` (unit rows, float32 or float16, in keep order) -> who is a near-duplicate.
    Rows before `first` are kept without being compared (an earlier run's survivors: only the
    rows after them are compared, with every row before)."""
    n = len(x)
    removed = np.zeros(n, bool)
    dup = np.full(n, -1, np.int64)
    sim = np.full(n, np.nan, np.float32)
    threshold = 1.0 - eps
    for start in range(max(1, first), n, block_rows):
        stop = min(n, start + block_rows)
        block = np.asarray(x[start:stop], np.float32)
        earlier = np.asarray(x[:stop], np.float32)
        s = block @ earlier.T  # [b, stop]: each of the block's similarity to every earlier member, a row each
        # only members strictly before each row's own count (the upper triangle of the paper's matrix)
        s[:, start:stop][np.triu(np.ones((stop - start, stop - start), bool))] = -np.inf
        best = s.argmax(axis=1)  # along rows in memory: the first of equal maxima, as before
        best_sim = s[np.arange(stop - start), best]
        hit = best_sim > threshold
        removed[start:stop] = hit
        dup[start:stop] = np.where(hit, best, -1)
        sim[start:stop] = np.where(hit, best_sim, np.nan)
    return ClusterDedup(removed, dup, sim)


def dedup_cluster(x, distance, shards, keys, eps: float, keep: str, seed: int, block_rows: int = 512,
                  fixed=None) -> ClusterDedup:
    """One cluster's members in any order -> the result in that same order (indices too).
    `fixed` (bool [n]): members an earlier run kept (an extension's parent): they come first in
    keep order and are never removed, so a new member that copies one of them is."""
    order = keep_order(distance, shards, keys, keep, seed)
    if fixed is not None:
        fixed = np.asarray(fixed, bool)
        order = np.concatenate([order[fixed[order]], order[~fixed[order]]])
    res = dedup_ordered(np.asarray(x)[order], eps, block_rows, first=int(fixed.sum()) if fixed is not None else 1)
    back = np.empty_like(order)
    back[order] = np.arange(len(order))
    dup = np.where(res.duplicate_of >= 0, order[np.maximum(res.duplicate_of, 0)], -1)
    removed, dup, sim = res.removed[back], dup[back], res.similarity[back]
    if fixed is not None:  # an earlier run's survivors are pairwise apart already; theirs is decided
        removed, dup, sim = removed & ~fixed, np.where(fixed, -1, dup), np.where(fixed, np.nan, sim).astype(np.float32)
    return ClusterDedup(removed, dup, sim)
