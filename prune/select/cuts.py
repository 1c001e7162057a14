"""Keep-fraction selection with thresholds from per-group histograms, never a global sort.

Every sample has one uint64 priority (prune/select/policies.py: larger = kept first). A group is
the whole set, or one cluster when `balanced`.

Selection is exact with bounded memory, in two light passes over the shards:
  1. each shard returns a histogram of its priorities' top bits per group; summed on the driver;
  2. for every (group, edge) the driver finds the bin the cut falls in, each shard returns
     only the priorities inside those bins, and the exact cut is read off them.
Edges are the keep fractions of the distance bands (0.1, 0.2, ..., f): a sample's band is
the first edge whose cut it clears, so the pruned shards of bands 0..b are exactly the
selection at that smaller fraction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np


def band_edges(keep_fraction: float, band_step: float) -> list[float]:
    """Ascending keep fractions that end the bands: band_step, 2*band_step, ..., keep_fraction."""
    n = math.floor(keep_fraction / band_step + 1e-9)
    edges = [round(band_step * i, 10) for i in range(1, n + 1) if band_step * i < keep_fraction - 1e-9]
    return edges + [keep_fraction]


@dataclass(frozen=True)
class HistogramSpec:
    n_groups: int
    bits: int

    @classmethod
    def for_groups(cls, n_groups: int) -> "HistogramSpec":
        """As many bins as fit in ~16M counters in all (65,536 per group at most)."""
        bits = int(min(16, max(6, math.floor(math.log2(2**24 / max(1, n_groups))))))
        return cls(n_groups, bits)

    @property
    def bins(self) -> int:
        return 1 << self.bits

    def bin_of(self, prio: np.ndarray) -> np.ndarray:
        return (prio >> np.uint64(64 - self.bits)).astype(np.int64)


def histogram(prio: np.ndarray, groups: np.ndarray, spec: HistogramSpec) -> np.ndarray:
    """Counts [n_groups, bins] of one shard's (ok) samples."""
    hist = np.zeros((spec.n_groups, spec.bins), np.int64)
    add_sparse(hist, sparse_histogram(prio, groups, spec))
    return hist


def sparse_histogram(prio: np.ndarray, groups: np.ndarray, spec: HistogramSpec) -> tuple[np.ndarray, np.ndarray]:
    """(flat bin index, count) of the non-empty bins: at most one entry per sample, whatever k is."""
    flat = groups.astype(np.int64) * spec.bins + spec.bin_of(prio)
    return np.unique(flat, return_counts=True)


def add_sparse(hist: np.ndarray, sparse: tuple[np.ndarray, np.ndarray]) -> None:
    """Add a shard's sparse histogram into the driver's dense [n_groups, bins] sum, in place."""
    idx, counts = sparse
    np.add.at(hist.reshape(-1), idx, counts)


@dataclass
class CutPlan:
    """Pass-1 result: per group and edge, how many to keep and in which bin the cut falls."""

    spec: HistogramSpec
    edges: list[float]
    n_keep: np.ndarray  # [G, E]
    cut_bin: np.ndarray  # [G, E], -1 where nothing is kept
    need_in_bin: np.ndarray  # [G, E]: how many of the cut bin's largest priorities are kept

    def cut_cells(self) -> np.ndarray:
        """Sorted flat indices (group * bins + bin) of every bin a cut falls in."""
        g, e = np.nonzero(self.cut_bin >= 0)
        return np.unique(g.astype(np.int64) * self.spec.bins + self.cut_bin[g, e])


def plan_cuts(hist: np.ndarray, spec: HistogramSpec, edges: list[float], n_keep: np.ndarray | None = None) -> CutPlan:
    """From the summed histogram, the bin each edge's cut falls in for every group. `n_keep`
    [G, E]: how many each group keeps at each edge (a budget's); default floor(f * n_g + 0.5)."""
    totals = hist.sum(axis=1)
    above = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]  # above[g, b] = count in bins >= b
    G, E = hist.shape[0], len(edges)
    given = n_keep
    n_keep = np.zeros((G, E), np.int64)
    cut_bin = np.full((G, E), -1, np.int64)
    need = np.zeros((G, E), np.int64)
    for e, f in enumerate(edges):
        n_keep[:, e] = np.floor(f * totals + 0.5).astype(np.int64) if given is None else given[:, e]
        if (n_keep[:, e] > totals).any():
            raise ValueError("a budget keeps more samples of a group than it holds")
        for g in np.nonzero(n_keep[:, e] > 0)[0]:
            # the highest bin b with above[g, b] >= n_keep
            b = int(np.nonzero(above[g] >= n_keep[g, e])[0].max())
            cut_bin[g, e] = b
            strictly_above = above[g, b + 1] if b + 1 < spec.bins else 0
            need[g, e] = n_keep[g, e] - strictly_above
    return CutPlan(spec, edges, n_keep, cut_bin, need)


def boundary_values(prio: np.ndarray, groups: np.ndarray, plan: CutPlan) -> tuple[np.ndarray, np.ndarray]:
    """Pass 2, per shard: (cell, priority) of the samples that fall in a cut bin of their group.

    Two flat arrays, vectorized over all groups, whatever k is.
    """
    cells = groups.astype(np.int64) * plan.spec.bins + plan.spec.bin_of(prio)
    inside = np.isin(cells, plan.cut_cells())
    return cells[inside], prio[inside]


def merge_boundary_values(parts) -> tuple[np.ndarray, np.ndarray]:
    """All shards' cut-bin priorities, sorted by cell, then ascending priority within a cell."""
    parts = list(parts)
    cells = np.concatenate([c for c, _ in parts]) if parts else np.zeros(0, np.int64)
    values = np.concatenate([v for _, v in parts]) if parts else np.zeros(0, np.uint64)
    order = np.lexsort((values, cells))
    return cells[order], values[order]


@dataclass
class Cuts:
    """Exact thresholds: a sample of group g clears edge e iff keep[g, e] and prio >= cut[g, e]."""

    plan: CutPlan
    cut: np.ndarray  # [G, E] uint64
    any_kept: np.ndarray  # [G, E] bool

    def apply(self, prio: np.ndarray, groups: np.ndarray, hist_total: np.ndarray):
        """-> (keep bool, band int32 (-1: not kept), percentile float64) for one shard."""
        g = groups.astype(np.int64)
        clears = self.any_kept[g] & (prio[:, None] >= self.cut[g])  # [n, E]; monotone in e
        keep = clears[:, -1] if clears.shape[1] else np.zeros(len(prio), bool)
        band = np.where(keep, np.argmax(clears, axis=1), -1).astype(np.int32)
        return keep, band, percentile(prio, g, hist_total, self.plan.spec)


def finalize_cuts(plan: CutPlan, merged: tuple[np.ndarray, np.ndarray]) -> Cuts:
    """Each cut is the need_in_bin-th largest priority of its cell."""
    cells, values = merged
    G, E = plan.cut_bin.shape
    cut = np.zeros((G, E), np.uint64)
    any_kept = plan.cut_bin >= 0
    g, e = np.nonzero(any_kept)
    if len(g):
        cell = g.astype(np.int64) * plan.spec.bins + plan.cut_bin[g, e]
        end = np.searchsorted(cells, cell, side="right")  # values ascend within a cell
        cut[g, e] = values[end - plan.need_in_bin[g, e]]
    return Cuts(plan, cut, any_kept)


def percentile(prio: np.ndarray, groups: np.ndarray, hist: np.ndarray, spec: HistogramSpec) -> np.ndarray:
    """Approximate share of the group ranked above each sample, from the histogram.

    Exact to the bin; within a bin, interpolated on the priority value. 0 = kept first.
    """
    if len(prio) == 0:
        return np.zeros(0)
    totals = hist.sum(axis=1).astype(np.float64)
    above_excl = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1] - hist  # count in bins > b
    b = spec.bin_of(prio)
    shift = np.uint64(64 - spec.bits)
    within = (prio - (b.astype(np.uint64) << shift)).astype(np.float64) / float(2 ** (64 - spec.bits))
    pos = above_excl[groups, b] + (1.0 - within) * hist[groups, b]
    return np.clip(pos / np.maximum(totals[groups], 1.0), 0.0, 1.0)


def exact_cuts(
    spec: HistogramSpec, edges: list[float], histograms: Iterable, boundaries: Callable[[CutPlan], Iterable],
    n_keep: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[Cuts, np.ndarray]:
    """The two passes, over blocks mapped however the caller likes -> (exact cuts, summed histogram).

    `histograms` yields each block's `sparse_histogram`; `boundaries(plan)` yields each block's
    `boundary_values` for that plan; `n_keep(group sizes)` gives the keep counts [G, E] (a budget's;
    default floor(f * n_g + 0.5)). The select stage maps blocks to Ray tasks over scores files,
    `evaluate` maps them over arrays in memory: both get the same cuts from the same code.
    """
    hist = np.zeros((spec.n_groups, spec.bins), np.int64)
    for sparse in histograms:
        add_sparse(hist, sparse)
    plan = plan_cuts(hist, spec, edges, None if n_keep is None else n_keep(hist.sum(axis=1)))
    return finalize_cuts(plan, merge_boundary_values(boundaries(plan))), hist
