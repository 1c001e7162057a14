"""Coverage-centric strata (CCS, Zheng et al. 2023) of each selection group, from a histogram.

CCS drops the hardest share β of the data, splits the remaining distance range into equal-width
strata, and fills the strata evenly, smallest first, at random inside each. Here the strata come
from one pass of per-group distance histograms (`DIST_BINS` bins over [0, 2]), so every shard
puts a sample in the same stratum without seeing the others; stratum edges fall on bin edges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DIST_BINS = 256  # distance histogram bins over [0, 2] (1 - cosine)
DIST_MAX = 2.0


def distance_bins(distance: np.ndarray) -> np.ndarray:
    """The histogram bin of each distance (NaN: bin 0; only ok samples are ever binned)."""
    d = np.nan_to_num(np.asarray(distance, np.float64), nan=0.0)
    return np.clip((d / DIST_MAX * DIST_BINS).astype(np.int64), 0, DIST_BINS - 1)


def sparse_distance_histogram(groups: np.ndarray, distance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(flat index group * DIST_BINS + bin, count) of one block's non-empty cells."""
    return np.unique(np.asarray(groups, np.int64) * DIST_BINS + distance_bins(distance), return_counts=True)


@dataclass(frozen=True)
class Strata:
    """Per group: the bins kept (lo..hi, the hardest share above hi dropped) cut into `n` strata."""

    lo: np.ndarray  # int64 [G]: first bin holding a sample
    hi: np.ndarray  # int64 [G]: last bin kept (after dropping the hardest share)
    n: int  # strata per group
    sizes: np.ndarray  # int64 [G, n]: samples per stratum

    def stratum_of(self, groups: np.ndarray, distance: np.ndarray) -> np.ndarray:
        """Each sample's stratum in its group; -1 for the dropped hardest."""
        g = np.asarray(groups, np.int64)
        b = distance_bins(distance)
        lo, hi = self.lo[g], self.hi[g]
        width = np.maximum(hi - lo + 1, 1)
        s = np.clip((b - lo) * self.n // width, 0, self.n - 1)
        return np.where(b > hi, -1, s)


def plan_strata(hist: np.ndarray, n: int, drop_hardest: float) -> Strata:
    """From the summed [G, DIST_BINS] histogram: each group's kept range and strata sizes. The
    hardest share is dropped by whole bins: the bins above the one the (1 - β) quantile falls in."""
    G = hist.shape[0]
    totals = hist.sum(axis=1)
    cum = np.cumsum(hist, axis=1)
    nonempty = hist > 0
    lo = np.where(totals > 0, nonempty.argmax(axis=1), 0)
    keep = np.ceil((1.0 - drop_hardest) * totals).astype(np.int64)
    # the first bin where the cumulative count reaches the kept count
    hi = np.where(totals > 0, (cum < np.maximum(keep, 1)[:, None]).sum(axis=1), 0)
    hi = np.minimum(np.maximum(hi, lo), DIST_BINS - 1)
    width = np.maximum(hi - lo + 1, 1)
    bins = np.arange(DIST_BINS)
    stratum = np.clip((bins[None, :] - lo[:, None]) * n // width[:, None], 0, n - 1)
    inside = (bins[None, :] >= lo[:, None]) & (bins[None, :] <= hi[:, None])
    sizes = np.zeros((G, n), np.int64)
    rows = np.repeat(np.arange(G), DIST_BINS).reshape(G, DIST_BINS)
    np.add.at(sizes, (rows[inside], stratum[inside]), hist[inside])
    return Strata(lo.astype(np.int64), hi.astype(np.int64), n, sizes)
