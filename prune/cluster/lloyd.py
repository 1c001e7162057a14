"""Distributed spherical Lloyd refinement: per-block statistics, an exact reduce, an update.

The sample fit (prune/cluster/kmeans.py) sees a few percent of the data; these functions let every
embedding vote. One Lloyd iteration is a map over blocks (`block_stats`: a faiss IndexFlatIP
nearest-centroid search, then per-cluster sums and counts) and a reduce on the driver
(`combine`, then `spherical_update`). Nothing here knows about Ray or storage: the caller
supplies a `map_blocks(centroids)` that yields one `BlockStats` per block, wherever it runs.

Memory: a block's statistics are O(k·d) (dense sums) plus a few candidate points, and
`block_stats` works through its block in chunks, so a worker holds the centroids, one block and
O(k·d) of sums; the driver holds the centroids and one running `BlockStats`. With K = k·d·8 bytes
(one float64 or int64 [k, d] array): `block_stats` peaks at K (its accumulator, rounded and
converted to int64 in place) plus one chunk's temporaries; `combine(..., inplace=True)` adds into
the running total without a third array, so a task folding several blocks peaks near 2K beyond the
faiss index, one block and one chunk (`task_memory_bytes` sizes the Ray reservation from this).

Determinism: each block's float64 sums are rounded onto a fixed-point grid (2^-30) and kept as
int64. Integer addition is exact and commutes, so the reduced sums (hence the centroids) are
bit-identical whatever the task completion order, the number of nodes, or how blocks are grouped
into tasks, on nodes of one CPU type (faiss kernels differ between AVX2 and AVX-512 and may break
near-ties differently). Re-seed candidates are ranked by a strict key (cosine, block, row) for the
same reason.

Objective: `objective` is the sum over points of (1 - cos(x, nearest centroid)), i.e. half the
squared-L2 inertia on the unit sphere. faiss's spherical k-means reports the sum of the inner
products instead; the two are related by faiss_obj = n - objective.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import faiss
import numpy as np

from prune.cluster.kmeans import centroid_index, l2_normalize

FIXED_POINT_BITS = 30  # grid of the exact sums: 2^-30 ~ 1e-9, far below float32 resolution
_SCALE = float(1 << FIXED_POINT_BITS)
_MAX_COUNT = 1 << 32  # |sum| <= count per coordinate, so count * 2^30 stays below 2^63
CANDIDATES_PER_BLOCK = 8  # worst-fit points each block offers for re-seeding empty clusters
CHUNK_ROWS = 32_768  # rows searched at once: bounds the float64 temporaries of a block
_FIXED_ROWS = 1024  # centroid rows converted to int64 at once (bounds that conversion's temporary)
SAME_POINT_COS = 1.0 - 1e-5  # a re-seed candidate this close to a centroid would duplicate it


@dataclass
class BlockStats:
    """Sufficient statistics of one or more blocks for one Lloyd update."""

    sums: np.ndarray  # int64 [k, d]: per-cluster sums of the unit vectors, in units of 2^-30
    counts: np.ndarray  # int64 [k]: points nearest to each centroid
    cos_fixed: int  # sum of cos(x, nearest centroid), in units of 2^-30 (exact Python int)
    n: int  # points seen
    cand_cos: np.ndarray  # float32 [m]: cosine of the worst-fit points, ascending
    cand_key: np.ndarray  # int64 [m, 2]: (block id, row) of each, breaks ties
    cand_vec: np.ndarray  # float32 [m, d]: the points themselves, unit-norm
    cand_cluster: np.ndarray  # int64 [m]: the cluster each was nearest to (in these statistics)

    @property
    def objective(self) -> float:
        """Sum of (1 - cos) to the nearest centroid; faiss's spherical objective is n - this."""
        return float(self.n - self.cos_fixed / _SCALE)


def empty_stats(k: int, d: int) -> BlockStats:
    return BlockStats(
        np.zeros((k, d), np.int64), np.zeros(k, np.int64), 0, 0,
        np.zeros(0, np.float32), np.zeros((0, 2), np.int64), np.zeros((0, d), np.float32),
        np.zeros(0, np.int64),
    )


def block_stats(
    x: np.ndarray,
    centroids: np.ndarray,
    *,
    block_id: int = 0,
    n_candidates: int = CANDIDATES_PER_BLOCK,
    index: Optional[faiss.Index] = None,
    chunk_rows: int = CHUNK_ROWS,
    normalized: bool = False,
) -> BlockStats:
    """Statistics of the block `x` [n, d] (normalized here) against `centroids` [k, d].

    Works in chunks of `chunk_rows`, so beyond the block itself it holds one [k, d] float64
    accumulator (which becomes the int64 sums in place) and one chunk's temporaries. `index` lets a
    worker reuse one faiss index for many blocks. `normalized`: `x` is `l2_normalize`'s output
    already (a cached block, normalized once for every pass); normalizing is row by row, so the
    statistics are the same bits either way.
    """
    k, d = centroids.shape
    index = index if index is not None else centroid_index(centroids)
    acc = np.zeros((k, d), np.float64)
    counts = np.zeros(k, np.int64)
    cos_total = 0.0
    worst = (np.zeros(0, np.float32), np.zeros((0, 2), np.int64), np.zeros((0, d), np.float32), np.zeros(0, np.int64))
    for start in range(0, len(x), chunk_rows):
        xc = x[start : start + chunk_rows] if normalized else l2_normalize(x[start : start + chunk_rows])
        sims, ids = index.search(xc, 1)
        sims, ids = sims[:, 0], ids[:, 0]
        _add_by_cluster(acc, xc, ids)
        counts += np.bincount(ids, minlength=k)
        cos_total += float(np.sum(sims, dtype=np.float64))
        pick = _lowest_first(sims, n_candidates)  # rows ascending break ties, as (block, row) would
        key = np.stack([np.full(len(pick), block_id, np.int64), start + pick.astype(np.int64)], axis=1)
        new = (sims[pick], key, xc[pick], ids[pick].astype(np.int64))
        worst = _keep_worst(tuple(np.concatenate([a, b]) for a, b in zip(worst, new)), n_candidates)
        del xc, sims, ids
    return BlockStats(_to_fixed_inplace(acc), counts, round(cos_total * _SCALE), len(x), *worst)


SEGMENT_LOOP_MIN_ROWS = 8  # mean rows per cluster from which a loop of sums beats reduceat


def _add_by_cluster(acc: np.ndarray, x: np.ndarray, ids: np.ndarray) -> None:
    """acc[j] += sum of the rows of x nearest to j, in float64 (sorted by cluster, then one sum
    per cluster). Both ways below add each cluster's rows one after another in row order, so
    they give the same bits; numpy's reduceat along axis 0 is 2-3x slower than a loop of
    `np.sum(axis=0)` when clusters hold many rows, and faster when they hold a few."""
    if len(ids) == 0:
        return
    # a stable radix sort when the ids fit 16 bits (k <= 65,536: LAION's k included)
    order = np.argsort(ids.astype(np.uint16) if len(acc) <= 1 << 16 else ids, kind="stable")
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    xs, rows = x[order], sorted_ids[starts]
    if len(xs) >= SEGMENT_LOOP_MIN_ROWS * len(starts):
        sums = np.empty((len(starts), x.shape[1]), np.float64)
        bounds = np.r_[starts, len(xs)].tolist()
        for i in range(len(starts)):  # float64 accumulation without a float64 copy of the chunk
            np.sum(xs[bounds[i] : bounds[i + 1]], axis=0, dtype=np.float64, out=sums[i])
    else:
        sums = np.add.reduceat(xs, starts, axis=0, dtype=np.float64)
    # sums += acc rows, written back (a + b == b + a exactly, so this is the same as
    # acc[rows] += sums, without its two temporaries)
    sums += acc[rows]
    acc[rows] = sums


def _to_fixed_inplace(acc: np.ndarray) -> np.ndarray:
    """round(acc * 2^30) as int64, in acc's own buffer (acc is consumed): no [k, d] temporary."""
    np.multiply(acc, _SCALE, out=acc)
    np.rint(acc, out=acc)
    fixed = acc.view(np.int64)
    for s in range(0, len(acc), _FIXED_ROWS):  # numpy copies each (overlapping) slice before casting
        fixed[s : s + _FIXED_ROWS] = acc[s : s + _FIXED_ROWS]
    return fixed


def _worst(cos: np.ndarray, key: np.ndarray, m: int) -> np.ndarray:
    """Indices of the m lowest (cos, block, row): a strict order, so ties resolve the same everywhere."""
    cand = _below_mth(cos, m)
    return cand[np.lexsort((key[cand, 1], key[cand, 0], cos[cand]))[:m]]


def _lowest_first(cos: np.ndarray, m: int) -> np.ndarray:
    """Indices of the m lowest cos, ties to the lower index: `_worst` within one block's chunk."""
    cand = _below_mth(cos, m)
    return cand[np.argsort(cos[cand], kind="stable")[:m]]


def _below_mth(cos: np.ndarray, m: int) -> np.ndarray:
    """Indices (ascending) of every value <= the m-th lowest: all the m lowest, whatever the ties,
    found in linear time, so only a few are sorted."""
    if len(cos) <= 4 * m:
        return np.arange(len(cos))
    mth = np.partition(cos, m - 1)[m - 1]
    if np.isnan(mth):  # NaNs sort last; fewer than m numbers: every index, sorted by the caller
        return np.arange(len(cos))
    return np.flatnonzero(cos <= mth)


def _keep_worst(cands: tuple, m: int) -> tuple:
    cos, key = cands[0], cands[1]
    pick = _worst(cos, key, m)
    return tuple(a[pick] for a in cands)


def _candidates(s: BlockStats) -> tuple:
    return s.cand_cos, s.cand_key, s.cand_vec, s.cand_cluster


def combine(a: BlockStats, b: BlockStats, max_candidates: Optional[int] = None, *, inplace: bool = False) -> BlockStats:
    """a + b. Exact and commutative: any split of the data into blocks, reduced in any order,
    gives the same sums, counts and objective. Keeps the `max_candidates` worst-fit points
    (default: k, never more re-seeds are needed).

    `inplace=True` adds b's sums into a's (which must be writable and not shared) and returns a
    `BlockStats` on that buffer: a running total then needs no third [k, d] array."""
    counts = a.counts + b.counts
    if counts.max(initial=0) >= _MAX_COUNT:
        raise OverflowError("a cluster holds more than 2^32 points: fixed-point sums would overflow")
    m = a.sums.shape[0] if max_candidates is None else max_candidates
    cands = _keep_worst(tuple(np.concatenate([x, y]) for x, y in zip(_candidates(a), _candidates(b))), m)
    sums = np.add(a.sums, b.sums, out=a.sums) if inplace else a.sums + b.sums
    return BlockStats(sums, counts, a.cos_fixed + b.cos_fixed, a.n + b.n, *cands)


def reduce_stats(parts: Iterable[BlockStats], max_candidates: Optional[int] = None) -> BlockStats:
    """Fold block statistics as they arrive: the caller never holds more than one running total
    (a copy of the first part, then added into in place; the parts are left unchanged)."""
    total = None
    for part in parts:
        if total is None:
            total = BlockStats(part.sums.copy(), part.counts.copy(), part.cos_fixed, part.n, *_candidates(part))
        else:
            total = combine(total, part, max_candidates, inplace=True)
    if total is None:
        raise ValueError("no block statistics to reduce: no embeddings to refine on")
    return total


def task_memory_bytes(k: int, d: int, block_rows: int, chunk_rows: int = CHUNK_ROWS, base: int = 256 << 20) -> int:
    """Heap bytes a task folding blocks of up to `block_rows` rows against k centroids of dim d needs:
    the Ray `memory=` reservation of a refine task, so Ray packs no more of them on a node than its
    memory holds. With K = k·d·8:

    - 3K: the running total's int64 sums, the next block's accumulator (then its sums), and the
      serialized result Ray writes when the task returns;
    - k·d·8: the centroids normalized for the faiss index plus the index's own copy (float32 each);
    - a block: block_rows·d·4 three times (Arrow table, float32 matrix, its finite-rows copy);
    - a chunk: min(chunk_rows, block_rows)·d·24 (normalized rows, sorted copy, float64 sums, gather);
    - `base`: the worker process itself (Python, numpy, pyarrow, faiss).
    """
    kd8 = k * d * 8
    chunk = min(chunk_rows, max(block_rows, 0))
    return int(3 * kd8 + kd8 + 3 * block_rows * d * 4 + chunk * d * 24 + base)


def spherical_update(total: BlockStats, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """New unit centroids = normalized cluster sums; -> (centroids float32 [k, d], re-seeded ids).

    Empty clusters, in index order, take the worst-fit candidates, worst first (the points the
    current centroids explain least), skipping a candidate that would duplicate a centroid:
    one whose own cluster it would leave empty (its only member, or the last of its members taken),
    or one (numerically, cos >= SAME_POINT_COS) on a new centroid or on a seed already taken, as
    exact duplicates are. Taking those would leave two identical centroids that swap points and
    re-seed each other every pass, never stopping before the cap. Clusters left empty for want of
    usable candidates, and clusters whose points cancel out (zero sum), keep their old centroid.
    """
    new = l2_normalize(centroids).copy()
    sums = total.sums.astype(np.float64)  # the 2^30 scale cancels in the normalization
    norms = np.linalg.norm(sums, axis=1)
    ok = (total.counts > 0) & (norms > 0)
    np.divide(sums, np.where(ok, norms, 1.0)[:, None], out=sums)
    np.copyto(new, sums, casting="same_kind", where=ok[:, None])
    del sums
    empty = np.flatnonzero(total.counts == 0)
    left = total.counts.copy()  # members each cluster keeps as its points are taken as seeds
    reseeded = []
    cands = iter(range(len(total.cand_cos)))
    for j in empty:
        for i in cands:
            v = l2_normalize(total.cand_vec[i : i + 1])[0]
            own = int(total.cand_cluster[i])
            if left[own] <= 1:
                continue
            cos = new @ v
            cos[j] = -np.inf  # j's old centroid is being replaced
            if float(cos.max()) >= SAME_POINT_COS:
                continue
            left[own] -= 1
            new[j] = v
            reseeded.append(j)
            break
        else:
            break  # no usable candidate left for this or any later empty cluster
    return new, np.asarray(reseeded, np.int64)


def relative_change(previous: float, current: float) -> float:
    """|previous - current| / previous; 0 when both are 0 (every point on its centroid)."""
    if previous == current:
        return 0.0
    return abs(previous - current) / max(abs(previous), 1e-300)


def max_shift(old: np.ndarray, new: np.ndarray) -> float:
    """Largest 1 - cos(old_j, new_j): how far any centroid moved in this update."""
    return float(np.max(1.0 - np.sum(old.astype(np.float64) * new, axis=1), initial=0.0))


def refine(
    centroids: np.ndarray,
    map_blocks: Callable[[np.ndarray], Iterable[BlockStats]],
    max_iter: int,
    tol: float = 0.0,
    on_iteration: Optional[Callable[[dict], None]] = None,
) -> tuple[np.ndarray, dict]:
    """Lloyd iterations: statistics of every block against the centroids, then an update.

    Each iteration's `objective` is that of the centroids entering it (as faiss's `obj`), the
    update is always applied. Stops after `max_iter` updates ("max_iter"), when the objective
    changed by at most `tol` relatively since the previous iteration ("tol"), or when an update
    moved nothing ("converged"). An iteration that re-seeded a cluster never stops on `tol`.

    `final_objective` / `mean_distance_all` in the metadata are the last pass's (no extra pass is
    made): of the saved centroids when the stop is "converged" (that update moved nothing), else of
    the centroids entering the last pass, one update before the saved ones
    (`final_objective_centroids` says which).
    """
    c = l2_normalize(centroids)
    log: list[dict] = []
    stop = "max_iter"
    for it in range(max_iter):
        t0 = time.perf_counter()
        total = reduce_stats(map_blocks(c), max_candidates=len(c))
        new, reseeded = spherical_update(total, c)
        entry = {
            "iteration": it,
            "objective": total.objective,
            "mean_distance": total.objective / max(total.n, 1),
            "n": total.n,
            "empty": int((total.counts == 0).sum()),
            "reseeded": [int(j) for j in reseeded],
            "max_shift": max_shift(c, new),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        log.append(entry)
        if on_iteration:
            on_iteration(entry)
        moved = not np.array_equal(new, c)
        c = new
        if not moved:
            stop = "converged"
            break
        if len(log) > 1 and not len(reseeded) and relative_change(log[-2]["objective"], entry["objective"]) <= tol:
            stop = "tol"
            break
    last = log[-1] if log else None
    meta = {
        "iterations": len(log),
        "max_iter": max_iter,
        "tol": tol,
        "stop_reason": stop,
        "objective": "log[].objective: sum over all points of (1 - cos) to the nearest centroid, for the centroids entering that pass",
        "reseeded_total": sum(len(e["reseeded"]) for e in log),
        "final_objective": last["objective"] if last else None,
        "mean_distance_all": last["mean_distance"] if last else None,
        "n_all": last["n"] if last else 0,
        "final_objective_centroids": (
            "saved" if stop == "converged" else "entering the last pass (the saved centroids are one update further)"
        ),
        "log": log,
    }
    return c, meta


def objective_of(blocks: Iterable[np.ndarray], centroids: np.ndarray) -> float:
    """Sum of (1 - cos) of the points of `blocks` to their nearest centroid (evaluation only)."""
    index = centroid_index(centroids)
    total = 0.0
    for x in blocks:
        sims, _ = index.search(l2_normalize(x), 1)
        total += len(x) - float(np.sum(sims, dtype=np.float64))
    return total
