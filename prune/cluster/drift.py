"""Drift of new samples from the prototypes an earlier run fitted: when to refit.

Against its own fit, 5% of a run's samples lie beyond the 95th percentile of its distances to the
nearest prototype, overall and in each cluster. New samples drawn like the old ones do the same;
new concepts the prototypes do not cover land farther. `drift` measures the share of new samples
beyond the parent's 95th percentile, overall and per cluster, and recommends a refit (a new run
over old and new together) when the overall share passes `REFIT_SHARE`, twice what no drift gives.
"""

from __future__ import annotations

import numpy as np

BINS = 1024  # distance histogram bins over [0, 2]: percentiles to 1/512
MAX = 2.0
QUANTILE = 0.95
REFIT_SHARE = 0.10  # overall share beyond the parent's 95th percentile that calls for a refit
MIN_CLUSTER = 50  # a cluster is flagged only with at least this many new samples


def bins_of(distance: np.ndarray) -> np.ndarray:
    d = np.asarray(distance, np.float64)
    return np.clip((d / MAX * BINS).astype(np.int64), 0, BINS - 1)


def sparse_histogram(cluster: np.ndarray, distance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(flat cell cluster * BINS + bin, count) of one block's non-empty cells (a task's part)."""
    return np.unique(np.asarray(cluster, np.int64) * BINS + bins_of(distance), return_counts=True)


def fold(parts) -> tuple[np.ndarray, np.ndarray]:
    """The sum of sparse histograms, still sparse (the reduce of the tasks' parts)."""
    parts = list(parts)
    cells = np.concatenate([c for c, _ in parts]) if parts else np.zeros(0, np.int64)
    counts = np.concatenate([n for _, n in parts]) if parts else np.zeros(0, np.int64)
    u, inv = np.unique(cells, return_inverse=True)
    return u, np.bincount(inv, weights=counts, minlength=len(u)).astype(np.int64)


def _upper_edge(bins: np.ndarray) -> np.ndarray:
    return (np.asarray(bins, np.float64) + 1) * MAX / BINS


def thresholds(hist: tuple[np.ndarray, np.ndarray], k: int) -> tuple[np.ndarray, float]:
    """(per cluster, overall) 95th percentile of the parent's distances, each the upper edge of the
    bin holding it (so no drift puts at most 5% beyond, never more); NaN for an empty cluster."""
    cells, counts = hist
    cluster, b = cells // BINS, cells % BINS
    per = np.full(k, np.nan)
    for c in np.unique(cluster):
        m = cluster == c
        order = np.argsort(b[m])
        cum = np.cumsum(counts[m][order])
        i = int(np.searchsorted(cum, QUANTILE * cum[-1], side="left"))
        per[c] = _upper_edge(b[m][order][i])
    overall = np.bincount(b, weights=counts, minlength=BINS)
    cum = np.cumsum(overall)
    return per, float(_upper_edge(int(np.searchsorted(cum, QUANTILE * cum[-1], side="left")))) if cum[-1] else float("nan")


def beyond_counts(cluster: np.ndarray, distance: np.ndarray, per: np.ndarray, overall: float, k: int) -> dict:
    """A block of new samples -> per cluster (new, beyond its p95) and overall beyond (summable)."""
    cluster, d = np.asarray(cluster, np.int64), np.asarray(distance, np.float64)
    limit = per[cluster]
    return {"new": np.bincount(cluster, minlength=k), "beyond": np.bincount(cluster[d > limit], minlength=k),
            "beyond_overall": int((d > overall).sum()), "n": len(d)}


def summarize(counts: dict, per: np.ndarray, overall: float, top: int = 20) -> dict:
    """The drift record: overall share, the clusters that moved most, and the recommendation."""
    n = int(counts["n"])
    share = counts["beyond_overall"] / n if n else 0.0
    new, beyond = counts["new"], counts["beyond"]
    rate = np.where(new > 0, beyond / np.maximum(new, 1), 0.0)
    flagged = np.nonzero((new >= MIN_CLUSTER) & (rate > REFIT_SHARE))[0]
    order = np.argsort(-rate * (new >= MIN_CLUSTER), kind="stable")[:top]
    refit = share > REFIT_SHARE
    return {
        "new_samples": n, "parent_p95": overall, "share_beyond_parent_p95": share,
        "share_beyond_own_cluster_p95": float(beyond.sum() / n) if n else 0.0,
        "refit_share": REFIT_SHARE, "refit_recommended": bool(refit),
        "clusters_flagged": [int(c) for c in flagged],
        "clusters": [{"cluster": int(c), "new": int(new[c]), "share_beyond": float(rate[c]),
                      "parent_p95": float(per[c])} for c in order if new[c]],
        "recommendation": (f"refit: {share:.1%} of the new samples lie beyond the parent's 95th percentile "
                           f"(more than {REFIT_SHARE:.0%}); run ssl-prune run over the old and new shards together"
                           if refit else f"no refit needed: {share:.1%} of the new samples lie beyond the parent's "
                           f"95th percentile (about 5% when nothing drifts; refit above {REFIT_SHARE:.0%})"),
    }
