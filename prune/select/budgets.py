"""Per-cluster budgets: how many samples each cluster keeps at every keep fraction.

The select stage keeps, in each cluster, its `n_keep[c, e]` best samples at every band edge e
(prune/select/cuts.py). Two properties make the bands work:
  - nested: n_keep[c, e] never decreases along the (ascending) edges, so the pruned shards of
    bands 0..b are exactly the selection at edge b's smaller fraction;
  - exact totals: every edge keeps floor(f * N + 0.5) samples in all (except `proportional`,
    today's rule, kept byte-identical).
Both come from one allocator, `divisor_allocations`: every cluster's seats above its floor are
ranked once, in a single fixed order (a divisor method, Jefferson/D'Hondt), and a budget of B
takes the first B of them, so a larger budget only adds seats (house-monotone) at any k.

A budget is a registered class (`BUDGETS`, `select.budget`) built from its parameters:
`BUDGETS.get("dbp")(temperature=0.05).allocate(sizes, edges, stats, seed)`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import faiss
import numpy as np

from prune.select.cuts import fold_sparse
from prune.settings import Registry

MAX_CAP = 2**50  # keeps w/j distinct across seats j of a cluster, and j exact in a float64
_MIN_WEIGHT = 2.0**-960  # relative to the largest weight: below it a weight counts as zero


def _ints(x, name: str, k: int) -> np.ndarray:
    a = np.asarray(x)
    if a.shape != (k,) or (a.size and a.dtype.kind not in "iu"):
        raise ValueError(f"{name} must be {k} integers, got {a.dtype} {a.shape}")
    if a.size and (a.min() < 0 or a.max() >= MAX_CAP):
        raise ValueError(f"{name} must be in [0, 2**50)")
    return a.astype(np.int64)


def _seats_at_least(w: np.ndarray, lo: np.ndarray, hi: np.ndarray, t: float) -> np.ndarray:
    """Per cluster, how many of its seats j in (lo, hi] have priority w / j >= t (float64 exact)."""
    if t <= 0.0:
        return hi - lo
    with np.errstate(divide="ignore", over="ignore"):
        j = np.floor(np.minimum(w / t, hi + 2.0)).astype(np.int64)  # within a seat of the answer
    while (up := (j <= hi) & (w / (j + 1) >= t)).any():
        j += up
    while (down := (j >= 1) & (w / np.maximum(j, 1) < t)).any():
        j -= down
    return np.clip(j, lo, hi) - lo


def _fill(w: np.ndarray, lo: np.ndarray, hi: np.ndarray, seats: np.ndarray) -> np.ndarray:
    """Seats above the floors [k, E]: column e takes the seats[e] first of all seats j in (lo, hi],
    ranked by priority w / j (descending), then position (clusters come in tie order), then j.

    w > 0. The priority cut is bracketed from the continuous count sum(clip(w * lam, lo, hi)), the
    bracket checked with exact counts, and the few seats inside it (about one per cluster) are
    ranked explicitly: O(k log k) per edge, whatever the budget.
    """
    out = np.zeros((len(w), len(seats)), np.int64)
    total = int((hi - lo).sum())
    b = np.unique(np.concatenate([lo / w, hi / w]))  # where the continuous count bends
    lo_f, hi_f, base = lo[:, None].astype(np.float64), hi[:, None].astype(np.float64), float(lo.sum())

    def count(lam: np.ndarray) -> np.ndarray:  # continuous seats above the floors, per lam
        x = np.multiply.outer(w, lam)
        return np.minimum(np.maximum(x, lo_f, out=x), hi_f, out=x).sum(0) - base

    def thresholds(targets) -> np.ndarray:  # priority 1 / lam where the continuous count = target
        tg = np.asarray(targets, np.float64)
        a, z = np.zeros(len(tg), np.int64), np.full(len(tg), len(b) - 1)
        va, vz = count(b[a]), count(b[z])  # 0 and total: va < tg <= vz inside, kept below
        while np.any(z - a > 1):
            mid = (a + z) // 2
            vm = count(b[mid])
            left = vm < tg
            a, va = np.where(left, mid, a), np.where(left, vm, va)
            z, vz = np.where(left, z, mid), np.where(left, vz, vm)
        lam = b[a] + (b[z] - b[a]) * np.clip((tg - va) / np.maximum(vz - va, 1e-300), 0.0, 1.0)
        with np.errstate(divide="ignore"):
            return np.where(tg >= total, 0.0, np.where((tg <= 0) | (lam <= 0), np.inf, 1.0 / lam))

    # exact counts lie within a seat per cluster below the continuous ones
    t_his, t_los = np.split(thresholds(np.concatenate([seats - 2.0, seats + len(w) + 2.0])), 2)
    for e, m in enumerate(int(s) for s in seats):
        if m == 0 or m == total:
            out[:, e] = 0 if m == 0 else hi - lo
            continue
        over, short, t_hi, t_lo = 2.0, len(w) + 2.0, t_his[e], min(t_los[e], t_his[e])
        while True:
            gt = _seats_at_least(w, lo, hi, np.nextafter(t_hi, np.inf))  # all of them are kept
            ge = _seats_at_least(w, lo, hi, t_lo)  # nothing below t_lo is kept
            if gt.sum() > m:
                over *= 4
                t_hi = thresholds([m - over])[0]
            elif ge.sum() < m:
                short *= 4
                t_lo = min(thresholds([m + short])[0], t_hi)
            else:
                break
        rest, n = m - int(gt.sum()), ge - gt
        if rest == 0 or rest == int(n.sum()):
            out[:, e] = gt if rest == 0 else ge
            continue
        owner = np.repeat(np.arange(len(w)), n)  # candidate seats, in (position, j) order
        j = lo[owner] + gt[owner] + 1 + np.arange(len(owner)) - np.repeat(np.cumsum(n) - n, n)
        p = w[owner] / j
        cut = -np.partition(-p, rest - 1)[rest - 1]  # the rest-th largest priority
        take = p > cut
        take[np.nonzero(p == cut)[0][: rest - int(take.sum())]] = True
        out[:, e] = gt + np.bincount(owner[take], minlength=len(w))
    return out


def divisor_allocations(weights, caps, budgets, floors=None, order=None) -> np.ndarray:
    """Divisor (Jefferson/D'Hondt) allocations [k, len(budgets)] int64, one column per budget.

    Column b: floors_c <= k_c <= caps_c, sum == budgets[b]; k_c = clip(floor(w_c * lam), floors_c,
    caps_c) for the largest lam whose total fits, the remaining seats one each in priority order.
    Every seat j > floors_c of cluster c has priority w_c / j (float64); seats go by priority,
    ties to the cluster first in `order` (a permutation of range(k); default: cluster index).
    Zero weights: those clusters get their floors, and only once every positive-weight cluster is
    at its cap do they share the rest as if equally weighted. Weights below 2**-960 times the
    largest count as zero. House-monotone: a larger budget never lowers any k_c.
    Raises ValueError if a budget is outside [sum(floors), sum(caps)] or an input is malformed.
    """
    w = np.asarray(weights, np.float64)
    k = w.size
    if w.shape != (k,) or not np.all(np.isfinite(w)) or (k and w.min() < 0):
        raise ValueError("weights must be a 1-d array of finite numbers >= 0")
    hi = _ints(caps, "caps", k)
    lo = np.zeros(k, np.int64) if floors is None else _ints(floors, "floors", k)
    if np.any(lo > hi):
        raise ValueError("floors must not exceed caps")
    order = np.arange(k) if order is None else np.asarray(order, np.int64)
    if order.shape != (k,) or not np.array_equal(np.sort(order), np.arange(k)):
        raise ValueError(f"order must be a permutation of range({k})")
    budgets = np.atleast_1d(np.asarray(budgets))
    if budgets.ndim != 1 or (budgets.size and budgets.dtype.kind not in "iu"):
        raise ValueError("budgets must be integers")
    if budgets.size and (budgets.min() < lo.sum() or budgets.max() > hi.sum()):
        raise ValueError(f"budgets {budgets.tolist()} leave [sum(floors), sum(caps)] = [{lo.sum()}, {hi.sum()}]")
    w, lo, hi = w[order], lo[order], hi[order]  # clusters in tie order from here on
    pos = (w > 0) & (w >= (w.max() if k else 0.0) * _MIN_WEIGHT)
    if pos.any():
        w = np.ldexp(w, -int(np.frexp(w.max())[1]))  # exact: priorities keep their order and ties
    extra = budgets.astype(np.int64) - lo.sum()
    room = int(np.where(pos, hi - lo, 0).sum())
    out = lo[:, None] + np.zeros((k, len(budgets)), np.int64)
    for tier, seats in ((pos, np.minimum(extra, room)), (~pos, np.maximum(extra - room, 0))):
        idx = np.nonzero(tier & (hi > lo))[0]
        if len(idx) and seats.size and seats.max() > 0:
            out[idx] += _fill(np.where(pos, w, 1.0)[idx], lo[idx], hi[idx], seats)
    result = np.empty_like(out)
    result[order] = out
    return result


def divisor_allocation(weights, caps, budget: int, floors=None, order=None) -> np.ndarray:
    """One budget's divisor allocation, int64 [k]: see `divisor_allocations`."""
    return divisor_allocations(weights, caps, [budget], floors, order)[:, 0]


SUM_SCALE = 2.0**32  # distance sums in fixed point: integers add exactly, in any order and grouping


def distance_sums(groups: np.ndarray, distance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One block's per-group sums of distance, sparse (group ids, int64 sums of distance × 2^32
    rounded): blocks reduced in any grouping (`cuts.fold_sparse`) give the same sums, so the same budgets."""
    fixed = np.round(np.asarray(distance, np.float64) * SUM_SCALE).astype(np.int64)
    return fold_sparse([(np.asarray(groups, np.int64), fixed)])


def dense_sums(sparse: tuple[np.ndarray, np.ndarray], n_groups: int) -> np.ndarray:
    """`distance_sums` (summed over blocks) -> float64 [n_groups] for `ClusterStats`."""
    ids, fixed = sparse
    sums = np.zeros(n_groups)
    sums[ids] = fixed / SUM_SCALE
    return sums


@dataclass(frozen=True)
class ClusterStats:
    """What budgets may need of the clusters (cluster c at index c)."""

    sizes: np.ndarray  # int64 [k]
    distance_sums: np.ndarray  # float64 [k]: sum over members of (1 - cos) to the centroid
    centroids: np.ndarray | None = None  # float32 [k, d], unit rows

    def intra(self) -> np.ndarray:
        """Mean member distance to the centroid per cluster; 0 for empty clusters."""
        sizes = np.asarray(self.sizes, np.float64)
        return np.asarray(self.distance_sums, np.float64) / np.maximum(sizes, 1.0) * (sizes > 0)


def inter_distances(centroids: np.ndarray, neighbours: int) -> np.ndarray:
    """float64 [k]: mean (1 - cos) of each centroid to its min(neighbours, k - 1) nearest others
    (exact faiss inner-product search over the normalized rows); 0 when k <= 1."""
    c = np.ascontiguousarray(centroids, np.float32)
    k = len(c)
    n = min(int(neighbours), k - 1)
    if n <= 0:
        return np.zeros(k)
    c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    index = faiss.IndexFlatIP(c.shape[1])
    index.add(c)
    sims, ids = index.search(c, n + 1)
    other = ids != np.arange(k)[:, None]
    other[other.all(axis=1), -1] = False  # self tied out of the list: drop the farthest instead
    return (1.0 - sims[other].reshape(k, n).astype(np.float64)).mean(axis=1)


def edge_budgets(sizes: np.ndarray, fractions) -> np.ndarray:
    """int64 [E]: floor(f * N + 0.5) for each fraction, N = sum(sizes)."""
    return np.floor(np.asarray(fractions, np.float64) * float(np.sum(sizes)) + 0.5).astype(np.int64)


def _check(sizes, fractions) -> tuple[np.ndarray, np.ndarray]:
    sizes = _ints(sizes, "sizes", np.asarray(sizes).size)
    f = np.asarray(fractions, np.float64).reshape(-1)
    if f.size and (f.min() < 0 or f.max() > 1 or np.any(np.diff(f) < 0)):
        raise ValueError(f"fractions must ascend within [0, 1], got {list(fractions)}")
    return sizes, f


class Budget(ABC):
    """How many samples each cluster keeps at each keep fraction."""

    name: ClassVar[str]  # the `select.budget` that selects this class

    @abstractmethod
    def allocate(self, sizes: np.ndarray, fractions: list[float], stats: ClusterStats | None, seed: int) -> np.ndarray:
        """int64 [k, len(fractions)]: per-cluster keep counts, non-decreasing along the fractions."""


BUDGETS: Registry[type[Budget]] = Registry("select.budget")


@BUDGETS.register
@dataclass(frozen=True)
class Proportional(Budget):
    """Today's rule: each cluster keeps floor(f * n_c + 0.5). Column sums are whatever that gives
    (within k/2 of f * N), so existing outputs stay byte-identical. Ignores stats and seed."""

    name: ClassVar[str] = "proportional"

    def allocate(self, sizes, fractions, stats=None, seed=0):
        sizes, f = _check(sizes, fractions)
        return np.floor(np.multiply.outer(sizes, f) + 0.5).astype(np.int64)


@BUDGETS.register
@dataclass(frozen=True)
class CappedEqual(Budget):
    """Vo et al. 2024: every cluster keeps min(x, n_c) for the largest x that fits the budget
    floor(f * N + 0.5); the few seats left go one each to the clusters above x, lowest index first.
    Rare clusters keep everything, frequent ones are thinned. Ignores stats and seed."""

    name: ClassVar[str] = "capped_equal"

    def allocate(self, sizes, fractions, stats=None, seed=0):
        sizes, f = _check(sizes, fractions)
        return divisor_allocations(np.ones(len(sizes)), sizes, edge_budgets(sizes, f))


@BUDGETS.register
@dataclass(frozen=True)
class DBP(Budget):
    """Abbas et al. 2024 (density-based pruning): weights softmax(d_intra * d_inter / temperature)
    over the non-empty clusters, divisor-allocated with caps n_c and floors min(n_c, min_per_cluster)
    to the budget floor(f * N + 0.5). Needs `stats` with centroids; ignores seed.

    temperature (0.1): lower favours complex clusters more; very large gives capped_equal.
    neighbours (20): centroids averaged for d_inter (fewer when there are fewer clusters).
    min_per_cluster (0, the paper's rule): 1 keeps every non-empty cluster represented, at the
    cost of a ValueError when a budget is below the number of non-empty clusters.
    """

    name: ClassVar[str] = "dbp"
    temperature: float = 0.1
    neighbours: int = 20
    min_per_cluster: int = 0

    def __post_init__(self):
        if not (np.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"dbp temperature must be > 0, got {self.temperature}")
        if self.neighbours < 1 or self.min_per_cluster < 0:
            raise ValueError("dbp needs neighbours >= 1 and min_per_cluster >= 0")

    def weights(self, stats: ClusterStats) -> np.ndarray:
        """float64 [k]: the softmax of the complexity over non-empty clusters, 0 for empty ones.
        Empty clusters' centroids take no part in the neighbour search."""
        if stats is None or stats.centroids is None:
            raise ValueError("the dbp budget needs ClusterStats with centroids")
        full = np.asarray(stats.sizes) > 0
        inter = np.zeros(len(full))
        inter[full] = inter_distances(np.asarray(stats.centroids)[full], self.neighbours)
        z = (stats.intra() * inter)[full] / self.temperature
        w = np.zeros(len(full))
        if full.any():
            e = np.exp(z - z.max())
            w[full] = e / e.sum()
        return w

    def allocate(self, sizes, fractions, stats, seed=0):
        sizes, f = _check(sizes, fractions)
        if stats is None or len(stats.sizes) != len(sizes):
            raise ValueError("the dbp budget needs ClusterStats for the same clusters as sizes")
        floors = np.minimum(sizes, self.min_per_cluster)
        return divisor_allocations(self.weights(stats), sizes, edge_budgets(sizes, f), floors)
