"""`select.policy: auto`: one default for any pool, the rule chosen from what the pool shows.

Measured (docs/concepts.md, "What to use"): on clean pools dedup then random is the only selection that never
loses to random, and on web-like pools (long-tailed concepts, junk, copy families) dedup then dbp
budgets in the hard order gains about twice as much, but loses on clean ones. What tells the two
apart, among the per-cluster and distance statistics screened (`benchmarks/auto_rule.py`), is the
tail of the prototype distances: web pools have samples much farther from every prototype than
the typical one (junk, rare concepts that own no prototype), clean ones do not. The statistic is
the ratio of the 99th to the 50th percentile of the distance to the nearest prototype, over every
assigned sample; at or above `select.auto_tail_ratio` the pool is treated as web-like.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from prune import schema

AUTO = "auto"  # the select.policy value
TAIL_BINS = 4096  # distance histogram bins over [0, 2]: quantiles to 1/2048 of the range
TAIL_MAX = 2.0
LOW_Q, HIGH_Q = 0.50, 0.99

CLEAN, WEB = "clean", "web"
RULES = {  # the select settings each rule stands for
    CLEAN: {"policy": schema.POLICY_RANDOM, "balanced": False},
    WEB: {"policy": schema.POLICY_HARD, "balanced": True, "budget": "dbp"},
}


def distance_histogram(distance: np.ndarray) -> np.ndarray:
    """int64 [TAIL_BINS]: the distances counted into equal bins over [0, 2] (a task's part)."""
    d = np.asarray(distance, np.float64)
    d = d[np.isfinite(d)]
    idx = np.clip((d / TAIL_MAX * TAIL_BINS).astype(np.int64), 0, TAIL_BINS - 1)
    return np.bincount(idx, minlength=TAIL_BINS).astype(np.int64)


def quantile(hist: np.ndarray, q: float) -> float:
    """The q-quantile of the histogram's distances (the smallest value with at least q of them at or
    below it, numpy's "inverted_cdf"), to the middle of the bin holding it."""
    total = int(hist.sum())
    if total == 0:
        return float("nan")
    i = int(np.searchsorted(np.cumsum(hist), q * total, side="left"))
    return (min(i, TAIL_BINS - 1) + 0.5) * TAIL_MAX / TAIL_BINS


@dataclass(frozen=True)
class AutoChoice:
    rule: str  # clean or web
    settings: dict  # what it sets in the select section
    tail_ratio: float  # p99 / p50 of the prototype distances
    threshold: float
    samples: int
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def choose(hist: np.ndarray, threshold: float) -> AutoChoice:
    """The rule for a pool whose prototype distances are `hist` (`distance_histogram`, summed)."""
    p50, p99 = quantile(hist, LOW_Q), quantile(hist, HIGH_Q)
    ratio = p99 / p50 if p50 > 0 else float("inf")
    n = int(hist.sum())
    web = bool(ratio >= threshold)
    rule = WEB if web else CLEAN
    what = ("dedup survivors in dbp budgets, far from the prototype first" if web
            else "a random subset of the dedup survivors")
    reason = (f"the 99th percentile of the distance to the nearest prototype is {ratio:.2f}x the median "
              f"({p99:.3f} / {p50:.3f}, {n} samples), {'at or above' if web else 'below'} select.auto_tail_ratio "
              f"{threshold:g}: a {'web-like' if web else 'clean'} pool, so {what}")
    return AutoChoice(rule, dict(RULES[rule]), round(float(ratio), 4), float(threshold), n, reason)
