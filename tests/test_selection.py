"""Histogram selection is exact: it picks what a global sort by priority would pick.

`select_like_the_pipeline` runs the same passes as pipelines/stages/select.py (priorities per
shard, summed histograms, cut plan, boundary values per shard, merged, finalized, applied per
shard); `brute_force` sorts every group's priorities at once. They must agree sample for sample.
"""

from __future__ import annotations

import numpy as np
import pytest

from prune.select import cuts as selection
from prune.select.cuts import (
    CutStats,
    HistogramSpec,
    band_edges,
    boundary_values,
    exact_cuts,
    plan_cuts,
    refinement_histogram,
    sparse_histogram,
)
from prune.select.policies import priorities

from .conftest import n_keep


def make_shards(n_shards=5, per_shard=(300, 900), k=6, seed=0, dist=None):
    """Fake scored shards: img2dataset keys, clusters, distances in a realistic narrow range."""
    rng = np.random.default_rng(seed)
    shards = []
    for s in range(n_shards):
        n = int(rng.integers(*per_shard))
        cluster = rng.integers(0, k, n)
        d = rng.normal(0.25 + 0.05 * cluster, 0.06).clip(0, 2).astype(np.float32) if dist is None else dist(rng, n)
        shards.append({
            "shard": f"{s:05d}",
            "keys": [f"{s:05d}{i:04d}" for i in range(n)],
            "distance": d.astype(np.float32),
            "cluster": cluster.astype(np.int32),
        })
    return shards


def select_like_the_pipeline(shards, policy, f, step, seed=0, balanced=False, k=6, spec=None, limit=16, refine=True,
                             stats=None):
    """The select stage's passes, without Ray. Returns per-shard (prio, groups, keep, band, pct).
    `limit`: priorities per cut the last pass may return (small here, so refinement runs)."""
    spec = spec or HistogramSpec.for_groups(k if balanced else 1)
    edges = band_edges(f, step)
    loaded = []
    for sh in shards:
        # the pipeline reads distance float32 from parquet and widens it
        prio = priorities(policy, sh["distance"].astype(np.float64), sh["shard"], list(sh["keys"]), seed)
        groups = sh["cluster"].astype(np.int64) if balanced else np.zeros(len(prio), np.int64)
        loaded.append((prio, groups))
    cuts, hist = exact_cuts(
        spec, edges, [sparse_histogram(p, g, spec) for p, g in loaded],
        lambda window: [boundary_values(p, g, window) for p, g in loaded],
        refine=(lambda step: [refinement_histogram(p, g, step) for p, g in loaded]) if refine else None,
        limit=limit, stats=stats,
    )
    out = []
    for prio, groups in loaded:
        keep, band, pct = cuts.apply(prio, groups, hist)
        out.append({"prio": prio, "groups": groups, "keep": keep, "band": band, "pct": pct})
    return out, edges, hist


def concat(results, name):
    return np.concatenate([r[name] for r in results])


def brute_force_top(prio, groups, f):
    """Boolean mask: per group, the floor(f*n+0.5) largest priorities."""
    mask = np.zeros(len(prio), bool)
    for g in np.unique(groups):
        idx = np.nonzero(groups == g)[0]
        order = idx[np.argsort(prio[idx], kind="stable")[::-1]]
        mask[order[: n_keep(f, len(idx))]] = True
    return mask


POLICIES = ["hard", "easy", "random"]


# --- exactness against a global sort --------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("balanced", [False, True])
@pytest.mark.parametrize("f, step", [(0.7, 0.1), (0.33, 0.1), (1.0, 0.25), (0.05, 0.1)])
def test_equals_brute_force_global_sort(policy, balanced, f, step):
    shards = make_shards(seed=POLICIES.index(policy) * 100 + int(balanced) * 10 + round(f * 100))
    res, edges, _ = select_like_the_pipeline(shards, policy, f, step, seed=3, balanced=balanced)
    prio, groups = concat(res, "prio"), concat(res, "groups")
    assert len(np.unique(prio)) == len(prio)  # the tie-break makes priorities distinct here
    keep, band = concat(res, "keep"), concat(res, "band")
    assert np.array_equal(keep, brute_force_top(prio, groups, f))
    for g in np.unique(groups):  # the exact count, per group
        assert keep[groups == g].sum() == n_keep(f, (groups == g).sum())
    # bands: the prefix 0..b is exactly the brute-force selection at edges[b]
    assert ((band >= 0) == keep).all() and band.max() < len(edges)
    for b, edge in enumerate(edges):
        assert np.array_equal((band >= 0) & (band <= b), brute_force_top(prio, groups, edge)), (b, edge)


@pytest.mark.parametrize("bits", [6, 8])
@pytest.mark.parametrize("refine", [False, True])
def test_exact_with_coarse_histograms(bits, refine):
    """Few bins means big cut bins: the last pass must still find the exact cut inside them,
    whether it reads whole bins or the refinement passes narrowed them first."""
    shards = make_shards(n_shards=7, seed=11)
    for balanced in (False, True):
        spec = HistogramSpec(6 if balanced else 1, bits)
        res, edges, hist = select_like_the_pipeline(shards, "hard", 0.6, 0.2, balanced=balanced, spec=spec,
                                                    refine=refine)
        assert hist.max() > 40  # the bins really hold many samples each
        prio, groups, band = concat(res, "prio"), concat(res, "groups"), concat(res, "band")
        for b, edge in enumerate(edges):
            assert np.array_equal((band >= 0) & (band <= b), brute_force_top(prio, groups, edge))


@pytest.mark.parametrize("limit", [1, 8, 64])
def test_bunched_distances_return_a_bounded_number_of_priorities(limit):
    """Distances bunched in a narrow range put most of a cluster in a few top-bit bins, so reading
    whole cut bins would return a large share of all priorities (issue 12: a third at LAION's k).
    Refinement passes narrow each cut's bin until the last pass returns at most `limit` per cut."""
    def bunched(rng, n):
        return (0.30 + 0.002 * rng.standard_normal(n)).astype(np.float32)

    shards = make_shards(n_shards=6, per_shard=(900, 1100), k=3, seed=5, dist=bunched)
    n = sum(len(s["keys"]) for s in shards)
    spec = HistogramSpec(3, HistogramSpec.for_groups(40_000).bits)  # the bins per group at LAION's k
    whole, refined = CutStats(), CutStats()
    for stats, refine in ((whole, False), (refined, True)):
        res, edges, _ = select_like_the_pipeline(shards, "hard", 0.7, 0.1, balanced=True, spec=spec, limit=limit,
                                                 refine=refine, stats=stats)
        prio, groups, band = concat(res, "prio"), concat(res, "groups"), concat(res, "band")
        for b, edge in enumerate(edges):
            assert np.array_equal((band >= 0) & (band <= b), brute_force_top(prio, groups, edge)), (refine, b)
    cuts_made = 3 * len(edges)
    assert whole.refine_passes == 0 and whole.boundary_values > n / 4  # whole bins: a large share
    assert 1 <= refined.refine_passes <= 4 and refined.boundary_values <= limit * cuts_made


def test_global_count_and_balanced_fractions():
    shards = make_shards(n_shards=6, per_shard=(800, 1200), k=5, seed=2)
    n = sum(len(s["keys"]) for s in shards)
    cluster = np.concatenate([s["cluster"] for s in shards])
    for f in (0.1, 0.5, 0.7, 0.9):
        res, _, _ = select_like_the_pipeline(shards, "hard", f, 0.1, balanced=False, k=5)
        assert concat(res, "keep").sum() == n_keep(f, n)
        res, _, _ = select_like_the_pipeline(shards, "hard", f, 0.1, balanced=True, k=5)
        keep = concat(res, "keep")
        for c in range(5):
            in_c = cluster == c
            assert keep[in_c].sum() == n_keep(f, in_c.sum())
            assert abs(keep[in_c].mean() - f) <= 0.5 / in_c.sum() + 1e-12


def test_hard_is_global_when_not_balanced_and_skews_clusters():
    """Hard, global: far clusters keep more (their distances are larger) - balance exists for this."""
    shards = make_shards(n_shards=6, per_shard=(800, 1200), k=5, seed=4)
    cluster = np.concatenate([s["cluster"] for s in shards])
    res, _, _ = select_like_the_pipeline(shards, "hard", 0.5, 0.1, balanced=False, k=5)
    keep = concat(res, "keep")
    rates = [keep[cluster == c].mean() for c in range(5)]
    assert rates[-1] > rates[0] + 0.3


# --- the policies ---------------------------------------------------------------------------


@pytest.mark.parametrize("balanced", [False, True])
def test_hard_keeps_the_far_easy_keeps_the_near(balanced):
    shards = make_shards(seed=5)
    d = np.concatenate([s["distance"] for s in shards])
    for policy in ("hard", "easy"):
        res, _, _ = select_like_the_pipeline(shards, policy, 0.4, 0.1, balanced=balanced)
        keep, groups = concat(res, "keep"), concat(res, "groups")
        for g in np.unique(groups):
            kept, pruned = d[keep & (groups == g)], d[~keep & (groups == g)]
            if policy == "hard":
                assert kept.min() >= pruned.max()
            else:
                assert kept.max() <= pruned.min()


def test_ties_only_at_equal_values_and_counts_stay_exact():
    """Near-duplicates have identical distances: the cut falls inside a run of ties."""
    def tied(rng, n):
        return rng.choice(np.array([0.2, 0.3, 0.3000001, 0.4], np.float32), n, p=[0.3, 0.4, 0.1, 0.2])

    shards = make_shards(n_shards=5, per_shard=(400, 600), seed=6, dist=tied)
    d = np.concatenate([s["distance"] for s in shards])
    n = len(d)
    for policy in ("hard", "easy"):
        for f in (0.1, 0.25, 0.5, 0.65, 0.9):
            res, edges, _ = select_like_the_pipeline(shards, policy, f, 0.05, seed=1)
            keep, band, prio = concat(res, "keep"), concat(res, "band"), concat(res, "prio")
            assert keep.sum() == n_keep(f, n)
            kept, pruned = d[keep], d[~keep]
            if policy == "hard":
                assert kept.min() >= pruned.max()
                boundary = kept.min()
            else:
                assert kept.max() <= pruned.min()
                boundary = kept.max()
            # a tie is split only at one value, and at that value the split is by the tie-break
            assert set(kept[np.isin(kept, pruned)]) <= {boundary}
            # distinct float32 distances a few ulps apart never collapse to one priority value
            value = prio >> np.uint64(32)
            lo, hi = value[d == np.float32(0.3)], value[d == np.float32(0.3000001)]
            assert len(np.unique(lo)) == len(np.unique(hi)) == 1
            assert (lo[0] < hi[0]) if policy == "hard" else (lo[0] > hi[0])
            for b, edge in enumerate(edges):
                assert ((band >= 0) & (band <= b)).sum() == n_keep(edge, n)


def test_all_identical_distances():
    shards = make_shards(n_shards=4, per_shard=(500, 501), seed=7, dist=lambda rng, n: np.full(n, 0.5, np.float32))
    n = sum(len(s["keys"]) for s in shards)
    res, edges, _ = select_like_the_pipeline(shards, "hard", 0.7, 0.1)
    band = concat(res, "band")
    for b, edge in enumerate(edges):
        assert ((band >= 0) & (band <= b)).sum() == n_keep(edge, n)


def test_random_is_deterministic_per_seed_and_differs_between_seeds():
    shards = make_shards(seed=8)
    a = concat(select_like_the_pipeline(shards, "random", 0.5, 0.1, seed=1)[0], "keep")
    b = concat(select_like_the_pipeline(shards, "random", 0.5, 0.1, seed=1)[0], "keep")
    c = concat(select_like_the_pipeline(shards, "random", 0.5, 0.1, seed=2)[0], "keep")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert 0.35 < (a & c).sum() / a.sum() < 0.65  # independent draws overlap by about f
    # random ignores the distance: kept and pruned look alike
    d = np.concatenate([s["distance"] for s in shards])
    assert abs(d[a].mean() - d[~a].mean()) < 0.02


def test_priorities_depend_on_shard_key_and_seed_not_on_order():
    keys = [f"00001{i:04d}" for i in range(50)]
    d = np.linspace(0.1, 0.9, 50)
    for policy in POLICIES:
        p = priorities(policy, d, "00001", keys, seed=0)
        assert p.dtype == np.uint64
        perm = np.random.default_rng(0).permutation(50)
        assert np.array_equal(priorities(policy, d[perm], "00001", [keys[i] for i in perm], 0), p[perm])
        assert not np.array_equal(priorities(policy, d, "00002", keys, 0), p)
        assert not np.array_equal(priorities(policy, d, "00001", keys, 1), p)
    hard, easy = priorities("hard", d, "00001", keys, 0), priorities("easy", d, "00001", keys, 0)
    assert (np.diff(hard.astype(np.float64)) > 0).all() and (np.diff(easy.astype(np.float64)) < 0).all()
    with pytest.raises(ValueError, match="policy"):
        priorities("bogus", d, "00001", keys, 0)


def test_nan_distance_gets_the_lowest_value():
    p = priorities("hard", np.array([np.nan, 0.0, 1.0]), "00000", ["a", "b", "c"], 0)
    assert (p[0] >> np.uint64(32)) == 0 and p[2] > p[1]


# --- percentile -----------------------------------------------------------------------------


@pytest.mark.parametrize("balanced", [False, True])
@pytest.mark.parametrize("bits", [None, 6])
def test_percentile_monotone_bounded_and_close_to_the_rank(balanced, bits):
    shards = make_shards(seed=9)
    spec = HistogramSpec(6 if balanced else 1, bits) if bits else None
    res, _, hist = select_like_the_pipeline(shards, "hard", 0.7, 0.1, balanced=balanced, spec=spec)
    prio, groups, pct = concat(res, "prio"), concat(res, "groups"), concat(res, "pct")
    assert ((pct >= 0) & (pct <= 1)).all()
    for g in np.unique(groups):
        idx = np.nonzero(groups == g)[0]
        order = idx[np.argsort(prio[idx])[::-1]]  # best first
        p = pct[order]
        assert (np.diff(p) >= 0).all()  # lower priority never has a smaller percentile
        exact = np.arange(len(order)) / len(order)  # share ranked above
        assert np.abs(p - exact).max() <= hist[g].max() / len(order) + 1e-12


# --- band edges -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "f, step, expected",
    [
        (0.7, 0.1, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]),
        (0.65, 0.1, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.65]),
        (0.3, 0.1, [0.1, 0.2, 0.3]),
        (1.0, 0.25, [0.25, 0.5, 0.75, 1.0]),
        (1.0, 0.1, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]),
        (0.05, 0.1, [0.05]),
        (0.7, 0.7, [0.7]),
        (0.7, 1.0, [0.7]),
        (0.6, 0.2, [0.2, 0.4, 0.6]),
    ],
)
def test_band_edges_examples(f, step, expected):
    assert band_edges(f, step) == pytest.approx(expected, abs=1e-12)
    assert band_edges(f, step)[-1] == f


@pytest.mark.parametrize("f", [0.01, 0.1, 0.29, 0.3, 0.5, 0.7, 0.93, 1.0])
@pytest.mark.parametrize("step", [0.05, 0.1, 0.2, 0.3, 1.0])
def test_band_edges_properties(f, step):
    edges = band_edges(f, step)
    assert edges[-1] == f
    assert all(b > a for a, b in zip(edges, edges[1:]))  # strictly ascending, no duplicate edge
    gaps = np.diff([0.0] + edges)
    assert np.allclose(gaps[:-1], step)
    assert 1e-9 < gaps[-1] <= step + 1e-9


def test_histogram_spec_bins():
    assert HistogramSpec.for_groups(1).bins == 2**16
    assert HistogramSpec.for_groups(256).bins == 2**16
    assert HistogramSpec.for_groups(1000).bins * 1000 <= 2**24
    assert HistogramSpec.for_groups(10**7).bits == 6  # never fewer than 64 bins
    p = np.array([0, 2**63, 2**64 - 1], np.uint64)
    assert HistogramSpec(1, 8).bin_of(p).tolist() == [0, 128, 255]


def test_empty_group_keeps_nothing_and_empty_shard_is_harmless():
    shards = make_shards(n_shards=3, k=4, seed=10)
    for s in shards:  # cluster 3 never occurs
        s["cluster"] = np.where(s["cluster"] == 3, 0, s["cluster"]).astype(np.int32)
    shards.append({"shard": "00099", "keys": [], "distance": np.zeros(0, np.float32), "cluster": np.zeros(0, np.int32)})
    res, _, hist = select_like_the_pipeline(shards, "hard", 0.5, 0.1, balanced=True, k=4)
    assert hist[3].sum() == 0
    assert len(res[-1]["keep"]) == 0 and len(res[-1]["pct"]) == 0
    keep, groups = concat(res, "keep"), concat(res, "groups")
    for g in range(3):
        assert keep[groups == g].sum() == n_keep(0.5, (groups == g).sum())


def test_cuts_are_monotone_over_edges():
    shards = make_shards(seed=12)
    spec = HistogramSpec.for_groups(6)
    edges = band_edges(0.9, 0.1)
    loaded = [(priorities("hard", s["distance"], s["shard"], s["keys"], 0), s["cluster"].astype(np.int64)) for s in shards]
    cuts, hist = exact_cuts(spec, edges, [sparse_histogram(p, g, spec) for p, g in loaded],
                            lambda window: [boundary_values(p, g, window) for p, g in loaded],
                            refine=lambda step: [refinement_histogram(p, g, step) for p, g in loaded])
    plan = plan_cuts(hist, spec, edges)
    assert (np.diff(plan.n_keep, axis=1) >= 0).all()
    assert (np.diff(cuts.cut.astype(np.float64), axis=1) <= 0).all()
    assert isinstance(cuts, selection.Cuts)
