"""Keep-fraction selection with thresholds from per-group histograms, never a global sort.

Every sample has one uint64 priority (prune/select/policies.py: larger = kept first). A group is
the whole set, or one cluster when `balanced`.

Selection is exact with bounded memory, in light passes over the shards:
  1. each shard returns a histogram of its priorities' top bits per group; summed on the driver;
  2. for every (group, edge) the driver finds the bin the cut falls in (a `Window`). Where such a
     bin still holds more than `limit` priorities (distances bunch up: a bin of a 10k-member
     cluster can hold thousands), each shard returns a histogram of the next bits inside the
     open bins only, and the driver narrows the window; repeated until every cut's bin is small
     (one or two passes at LAION's k), a radix select over the shards;
  3. each shard returns only the priorities inside the final bins (at most `limit` per cut), and
     the exact cut is read off them.
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


def fold_sparse(parts: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Several blocks' sparse counts added into one (exact in any grouping: a reduce in tasks)."""
    parts = list(parts)
    idx = np.concatenate([i for i, _ in parts]) if parts else np.zeros(0, np.int64)
    counts = np.concatenate([c for _, c in parts]) if parts else np.zeros(0, np.int64)
    keys, inverse = np.unique(idx, return_inverse=True)
    total = np.zeros(len(keys), np.int64)
    np.add.at(total, inverse, np.asarray(counts, np.int64))
    return keys, total


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


DEFAULT_LIMIT = 64  # priorities per cut that the last pass may return, at most (unless a bin cannot split)
MAX_COUNTERS = 1 << 24  # counters of a refinement pass's summed histogram


def _cell_keys(groups: np.ndarray, prio: np.ndarray, shift: int) -> np.ndarray:
    """One uint64 per (group, prio >> shift): the group in the bits the shifted priority leaves."""
    return (groups.astype(np.uint64) << np.uint64(64 - shift)) | (prio >> np.uint64(shift))


@dataclass
class Window:
    """Where each (group, edge) cut still lies: among group g's priorities p with
    p >> shift[g, e] == prefix[g, e] (count[g, e] of them) it is the need[g, e]-th largest."""

    active: np.ndarray  # [G, E] bool: the group keeps something at the edge
    shift: np.ndarray  # [G, E] int64
    prefix: np.ndarray  # [G, E] uint64
    count: np.ndarray  # [G, E] int64
    need: np.ndarray  # [G, E] int64

    @classmethod
    def from_plan(cls, plan: CutPlan, hist: np.ndarray) -> "Window":
        active = plan.cut_bin >= 0
        g = np.arange(hist.shape[0])[:, None]
        count = np.where(active, hist[g, np.maximum(plan.cut_bin, 0)], 0)
        shift = np.full(active.shape, 64 - plan.spec.bits, np.int64)
        return cls(active, shift, np.maximum(plan.cut_bin, 0).astype(np.uint64), count.astype(np.int64),
                   plan.need_in_bin.copy())

    def cells(self, mask: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
        """The distinct bins of the cuts in `mask`, as levels (offset of their ids, shift, sorted keys)."""
        levels, offset = [], 0
        g_all = np.broadcast_to(np.arange(mask.shape[0])[:, None], mask.shape)
        for shift in np.unique(self.shift[mask]):
            at = mask & (self.shift == shift)
            keys = np.unique((g_all[at].astype(np.uint64) << np.uint64(64 - int(shift))) | self.prefix[at])
            levels.append((offset, int(shift), keys))
            offset += len(keys)
        return levels

    def cell_ids(self, mask: np.ndarray, levels) -> np.ndarray:
        """[G, E] id of each masked cut's bin among `levels` (-1 elsewhere)."""
        ids = np.full(mask.shape, -1, np.int64)
        g_all = np.broadcast_to(np.arange(mask.shape[0])[:, None], mask.shape)
        for offset, shift, keys in levels:
            at = mask & (self.shift == shift)
            key = (g_all[at].astype(np.uint64) << np.uint64(64 - shift)) | self.prefix[at]
            ids[at] = offset + np.searchsorted(keys, key)
        return ids


def group_bits(n_groups: int) -> int:
    return max(1, int(n_groups).bit_length())


@dataclass(frozen=True)
class Refinement:
    """One refinement pass: the open bins (levels, as `Window.cells`) and how many bits to split them by."""

    levels: list
    bits: int


def next_refinement(window: Window, limit: int = DEFAULT_LIMIT) -> tuple[Refinement, np.ndarray] | None:
    """The pass that splits every cut bin still holding more than `limit` priorities (with bits
    left to split: the group needs its own bits of the key), and the cuts it concerns; None: done."""
    gbits = group_bits(window.active.shape[0])
    open_ = window.active & (window.count > limit) & (window.shift - 1 >= gbits)
    if not open_.any():
        return None
    levels = window.cells(open_)
    n_cells = sum(len(k) for _, _, k in levels)
    bits = int(min(16, max(1, math.floor(math.log2(MAX_COUNTERS / n_cells)))))
    bits = min(bits, int(window.shift[open_].min()) - gbits)
    return Refinement(levels, bits), open_


def _locate(prio: np.ndarray, groups: np.ndarray, levels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, bin id, the bin's shift) of the samples that fall in one of the levels' bins."""
    rows, ids, shifts = [], [], []
    for offset, shift, keys in levels:
        if not len(keys):
            continue
        key = _cell_keys(groups, prio, shift)
        pos = np.minimum(np.searchsorted(keys, key), len(keys) - 1)
        hit = np.flatnonzero(keys[pos] == key)
        rows.append(hit)
        ids.append(offset + pos[hit])
        shifts.append(np.full(len(hit), shift, np.int64))
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(rows), np.concatenate(ids), np.concatenate(shifts)


def refinement_histogram(prio: np.ndarray, groups: np.ndarray, step: Refinement) -> tuple[np.ndarray, np.ndarray]:
    """A refinement pass, per shard: sparse counts of (open bin, next `step.bits` bits)."""
    rows, ids, shifts = _locate(prio, groups, step.levels)
    sub = (prio[rows] >> (shifts - step.bits).astype(np.uint64)) & np.uint64((1 << step.bits) - 1)
    return np.unique(ids * (1 << step.bits) + sub.astype(np.int64), return_counts=True)


def narrowed(window: Window, step: Refinement, open_: np.ndarray, parts: Iterable) -> Window:
    """The window after a refinement pass: each open cut moves into the sub-bin its need falls in."""
    n_cells, width = sum(len(k) for _, _, k in step.levels), 1 << step.bits
    hist = np.zeros(n_cells * width, np.int64)
    for idx, counts in parts:
        np.add.at(hist, idx, counts)
    hist = hist.reshape(n_cells, width)
    above = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]  # above[c, b]: count in sub-bins >= b
    ids = window.cell_ids(open_, step.levels)[open_]
    need = window.need[open_]
    b = (above[ids] >= need[:, None]).sum(axis=1) - 1  # the highest sub-bin with enough at or above it
    strictly = np.where(b + 1 < width, above[ids, np.minimum(b + 1, width - 1)], 0)
    out = Window(window.active, window.shift.copy(), window.prefix.copy(), window.count.copy(), window.need.copy())
    out.need[open_] = need - strictly
    out.count[open_] = hist[ids, b]
    out.prefix[open_] = (window.prefix[open_] << np.uint64(step.bits)) | b.astype(np.uint64)
    out.shift[open_] = window.shift[open_] - step.bits
    return out


def boundary_values(prio: np.ndarray, groups: np.ndarray, window: Window) -> tuple[np.ndarray, np.ndarray]:
    """The last pass, per shard: (bin id, priority) of the samples that fall in a cut's final bin.

    Two flat arrays, vectorized over all groups, whatever k is; bin ids as `Window.cells(active)`.
    """
    rows, ids, _ = _locate(prio, groups, window.cells(window.active))
    return ids, prio[rows]


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


def finalize_cuts(plan: CutPlan, window: Window, merged: tuple[np.ndarray, np.ndarray]) -> Cuts:
    """Each cut is the need-th largest priority of its final bin."""
    cells, values = merged
    cut = np.zeros(window.active.shape, np.uint64)
    if window.active.any():
        cell = window.cell_ids(window.active, window.cells(window.active))[window.active]
        end = np.searchsorted(cells, cell, side="right")  # values ascend within a cell
        cut[window.active] = values[end - window.need[window.active]]
    return Cuts(plan, cut, window.active)


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


@dataclass
class CutStats:
    """What finding the cuts cost: refinement passes, and priorities the last pass returned."""

    refine_passes: int = 0
    boundary_values: int = 0


def exact_cuts(
    spec: HistogramSpec, edges: list[float], histograms: Iterable, boundaries: Callable[[Window], Iterable],
    n_keep: Callable[[np.ndarray], np.ndarray] | None = None,
    refine: Callable[[Refinement], Iterable] | None = None, limit: int = DEFAULT_LIMIT, stats: CutStats | None = None,
) -> tuple[Cuts, np.ndarray]:
    """The passes, over blocks mapped however the caller likes -> (exact cuts, summed histogram).

    `histograms` yields each block's `sparse_histogram`; `refine(step)` each block's
    `refinement_histogram` (None: no refinement, the last pass returns whole bins);
    `boundaries(window)` each block's `boundary_values`; `n_keep(group sizes)` gives the keep
    counts [G, E] (a budget's; default floor(f * n_g + 0.5)). The select stage maps blocks to Ray
    tasks over scores files, `evaluate` maps them over arrays in memory: the same cuts, the same code.
    """
    stats = stats if stats is not None else CutStats()
    hist = np.zeros((spec.n_groups, spec.bins), np.int64)
    for sparse in histograms:
        add_sparse(hist, sparse)
    plan = plan_cuts(hist, spec, edges, None if n_keep is None else n_keep(hist.sum(axis=1)))
    window = Window.from_plan(plan, hist)
    while refine is not None and (found := next_refinement(window, limit)) is not None:
        step, open_ = found
        window = narrowed(window, step, open_, refine(step))
        stats.refine_passes += 1
    merged = merge_boundary_values(boundaries(window))
    stats.boundary_values = len(merged[1])
    return finalize_cuts(plan, window, merged), hist
