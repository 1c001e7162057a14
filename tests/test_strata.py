"""The stratified (CCS) policy: strata from histograms, and every prefix of its order fills the strata
evenly, smallest first, with the hardest share last."""

from __future__ import annotations

import numpy as np
import pytest

from prune.select.policies import priorities
from prune.select.strata import DIST_BINS, distance_bins, plan_strata, sparse_distance_histogram


def _hist(groups, distance, n_groups):
    hist = np.zeros((n_groups, DIST_BINS), np.int64)
    idx, counts = sparse_distance_histogram(groups, distance)
    np.add.at(hist.reshape(-1), idx, counts)
    return hist


def water_fill(sizes: np.ndarray, budget: int) -> np.ndarray:
    """CCS's allocation, by its own loop: strata smallest first, each min(size, left / strata left)."""
    out = np.zeros(len(sizes), np.int64)
    left = budget
    order = np.argsort(sizes, kind="stable")
    for i, s in enumerate(order):
        take = min(sizes[s], left // (len(order) - i))
        out[s] = take
        left -= take
    return out


@pytest.mark.parametrize("drop", [0.0, 0.1, 0.3])
def test_strata_sizes_are_the_counts_of_stratum_of(drop):
    rng = np.random.default_rng(int(drop * 10))
    groups = rng.integers(0, 4, 5000)
    distance = rng.gamma(2.0, 0.08 * (1 + groups), 5000).clip(0, 2)
    strata = plan_strata(_hist(groups, distance, 4), 10, drop)
    s = strata.stratum_of(groups, distance)
    for g in range(4):
        counts = np.bincount(s[(groups == g) & (s >= 0)], minlength=10)
        np.testing.assert_array_equal(counts, strata.sizes[g])
        dropped = (groups == g) & (s < 0)
        in_g = (groups == g).sum()
        assert dropped.sum() <= np.ceil(drop * in_g) + 1e-9  # whole bins above the quantile's bin
        if dropped.any():  # the dropped are the far ones
            assert distance[dropped].min() >= distance[(groups == g) & (s >= 0)].max() - 2 / DIST_BINS
        assert (distance_bins(distance[(groups == g) & (s >= 0)]) <= strata.hi[g]).all()


def test_every_prefix_fills_the_strata_evenly_smallest_first():
    rng = np.random.default_rng(7)
    n = 20000
    distance = np.concatenate([rng.normal(0.3, 0.03, n // 2), rng.uniform(0.1, 0.9, n // 2)]).clip(0, 2)
    groups = np.zeros(n, np.int64)
    keys = [f"{i:09d}" for i in range(n)]
    strata = plan_strata(_hist(groups, distance, 1), 20, 0.1)
    prio = priorities("stratified", distance, "00000", keys, 3, groups, strata)
    order = np.argsort(prio)[::-1]
    s = strata.stratum_of(groups, distance)
    kept_total = (s >= 0).sum()
    for m in (200, 1000, 4000, 9000, int(kept_total)):
        got = np.bincount(s[order[:m]][s[order[:m]] >= 0], minlength=20)
        want = water_fill(strata.sizes[0], m)
        # the order draws each stratum's round from a uniform hash: even to within sampling noise
        level = m / 20
        assert np.abs(got - want).max() <= 4 * np.sqrt(level) + 3, (m, got, want)
        assert got.sum() == m  # the hardest share comes last
    assert (s[order[kept_total:]] == -1).all()
    # a seed is one order; another seed another
    again = priorities("stratified", distance, "00000", keys, 3, groups, strata)
    assert (again == prio).all() and (priorities("stratified", distance, "00000", keys, 4, groups, strata) != prio).any()
