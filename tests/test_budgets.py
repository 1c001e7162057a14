"""Per-cluster budgets (prune/select/budgets.py) against brute-force references on small cases:
exact counts, exact totals, bounds, nesting across fractions, house monotonicity at every budget."""

from __future__ import annotations

import heapq

import numpy as np
import pytest

from prune.select.budgets import (
    BUDGETS,
    DBP,
    Budget,
    CappedEqual,
    ClusterStats,
    Proportional,
    divisor_allocation,
    divisor_allocations,
    edge_budgets,
    inter_distances,
)
from prune.select.cuts import HistogramSpec, band_edges, plan_cuts


def seat_by_seat(weights, caps, floors, order) -> np.ndarray:
    """[k, sum(caps) - sum(floors) + 1]: the allocation at every budget, one seat at a time to the
    uncapped cluster with the largest weights_c / (k_c + 1), ties to the first in `order`; clusters
    of zero weight (or below 2**-960 of the largest) last, as if equally weighted."""
    w = np.asarray(weights, float)
    rank = np.empty(len(w), int)
    rank[np.asarray(order)] = np.arange(len(w))
    positive = (w > 0) & (w >= w.max() * 2.0**-960) if len(w) else w > 0
    k = np.array(floors, np.int64)
    states = [k.copy()]
    for _ in range(int(np.sum(caps) - np.sum(floors))):
        keys = [((0, -(w[c] / (k[c] + 1))) if positive[c] else (1, -(1.0 / (k[c] + 1))), rank[c], c)
                for c in range(len(w)) if k[c] < caps[c]]
        k[min(keys)[-1]] += 1
        states.append(k.copy())
    return np.array(states, np.int64).T


def heap_reference(weights, caps, floors, order, budgets) -> np.ndarray:
    """seat_by_seat at the given (ascending) budgets, with a heap: for a few hundred clusters."""
    w = np.asarray(weights, float)
    rank = np.empty(len(w), int)
    rank[np.asarray(order)] = np.arange(len(w))
    positive = (w > 0) & (w >= w.max() * 2.0**-960)
    k, heap, out = np.array(floors, np.int64), [], []

    def push(c):
        if k[c] < caps[c]:
            heapq.heappush(heap, ((0, -(w[c] / (k[c] + 1))) if positive[c] else (1, -(1.0 / (k[c] + 1))), rank[c], c))

    for c in range(len(w)):
        push(c)
    for budget in budgets:
        while k.sum() < budget:
            c = heapq.heappop(heap)[-1]
            k[c] += 1
            push(c)
        out.append(k.copy())
    return np.array(out, np.int64).T


def capped_equal_reference(sizes, budget) -> np.ndarray:
    """The largest cap x with sum(min(x, n_c)) <= budget by search, the rest one each by index."""
    sizes = np.asarray(sizes)
    x = max(x for x in range(int(sizes.max(initial=0)) + 1) if np.minimum(x, sizes).sum() <= budget)
    k = np.minimum(x, sizes)
    for c in np.nonzero(sizes > x)[0][: budget - k.sum()]:
        k[c] += 1
    return k


def assert_divisor_optimal(w, caps, floors, k):
    """The divisor condition: every seat given outranks every seat not given (priority w / j)."""
    w = np.asarray(w, float)
    given = (k > floors) & (w > 0)
    open_ = (k < caps) & (w > 0)
    if given.any() and open_.any():
        assert (w[given] / k[given]).min() >= (w[open_] / (k[open_] + 1)).max()


def random_stats(rng, sizes, d=8) -> ClusterStats:
    sizes = np.asarray(sizes, np.int64)
    c = rng.normal(size=(len(sizes), d)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    return ClusterStats(sizes, sizes * rng.uniform(0.05, 0.6, len(sizes)), c)


def random_case(rng, kind):
    k = int(rng.integers(1, 8))
    w = {
        "random": lambda: rng.random(k),
        "integers": lambda: rng.integers(0, 4, k).astype(float),  # exact ties such as 2/2 == 1/1
        "equal": lambda: np.ones(k),
        "extreme": lambda: rng.choice([0.0, 1e-300, 1e-200, 3.0, 1.5, 1e300], k),
    }[kind]()
    caps = rng.integers(0, 12, k)
    floors = np.minimum(caps, rng.integers(0, 3, k))
    order = rng.permutation(k) if rng.random() < 0.5 else np.arange(k)
    return w, caps, floors, order


@pytest.mark.parametrize("kind", ["random", "integers", "equal", "extreme"])
def test_divisor_matches_seat_by_seat_at_every_budget(kind):
    rng = np.random.default_rng(["random", "integers", "equal", "extreme"].index(kind))
    for _ in range(60):
        w, caps, floors, order = random_case(rng, kind)
        budgets = np.arange(floors.sum(), caps.sum() + 1)
        got = divisor_allocations(w, caps, budgets, floors, order)
        np.testing.assert_array_equal(got, seat_by_seat(w, caps, floors, order))
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got.sum(axis=0), budgets)
        assert (got >= floors[:, None]).all() and (got <= caps[:, None]).all()
        assert (np.diff(got, axis=1) >= 0).all()  # house-monotone
        b = int(rng.integers(floors.sum(), caps.sum() + 1))
        np.testing.assert_array_equal(divisor_allocation(w, caps, b, floors, order), got[:, b - floors.sum()])


def test_divisor_matches_the_reference_on_hundreds_of_clusters():
    rng = np.random.default_rng(13)
    for i in range(24):
        k = int(rng.integers(50, 200))
        w = [rng.random(k), rng.integers(0, 5, k).astype(float), np.exp(rng.normal(0, 20, k)), np.ones(k)][i % 4]
        caps = rng.integers(0, int(rng.choice([3, 60, 400])), k)
        floors = np.minimum(caps, rng.integers(0, int(rng.choice([1, 3, 20])), k))
        order = rng.permutation(k) if i % 2 else np.arange(k)
        budgets = np.unique(rng.integers(floors.sum(), caps.sum() + 1, 8))
        got = divisor_allocations(w, caps, budgets, floors, order)
        np.testing.assert_array_equal(got, heap_reference(w, caps, floors, order, budgets))


def test_divisor_ties_follow_the_order():
    assert divisor_allocation(np.ones(3), [5, 5, 5], 1).tolist() == [1, 0, 0]
    assert divisor_allocation(np.ones(3), [5, 5, 5], 4, order=[2, 0, 1]).tolist() == [1, 1, 2]
    # 2/2 == 1/1: the second seat of cluster 0 ties with the first of cluster 1
    assert divisor_allocation([2.0, 1.0], [5, 5], 2).tolist() == [2, 0]
    assert divisor_allocation([2.0, 1.0], [5, 5], 2, order=[1, 0]).tolist() == [1, 1]


def test_zero_weights_get_floors_until_the_others_are_capped():
    w, caps, floors = [0.0, 1.0, 0.0, 2.0], [3, 3, 3, 3], [1, 0, 0, 0]
    got = divisor_allocations(w, caps, np.arange(1, 13), floors)
    np.testing.assert_array_equal(got[[0, 2], :7], [[1] * 7, [0] * 7])  # budgets 1..7: floors only
    np.testing.assert_array_equal(got[[1, 3], 6], [3, 3])
    # budgets 7..12: then as if equally weighted (seat j of each has priority 1 / j)
    np.testing.assert_array_equal(got[[0, 2], 6:], [[1, 1, 2, 2, 3, 3], [0, 1, 1, 2, 2, 3]])
    np.testing.assert_array_equal(divisor_allocations(np.zeros(3), [2, 2, 2], [0, 1, 2, 3]),
                                  [[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]])


def test_divisor_edge_cases_and_bad_input():
    assert divisor_allocations([], [], [0]).shape == (0, 1)
    assert divisor_allocation([0.3], [7], 7).tolist() == [7]
    assert divisor_allocation([0.3, 0.2], [7, 0], 0).tolist() == [0, 0]
    with pytest.raises(ValueError, match="budgets"):
        divisor_allocation([1.0, 1.0], [2, 2], 5)
    with pytest.raises(ValueError, match="budgets"):
        divisor_allocation([1.0, 1.0], [2, 2], 1, floors=[1, 1])
    with pytest.raises(ValueError, match="floors"):
        divisor_allocation([1.0, 1.0], [2, 2], 3, floors=[3, 0])
    for w in ([-1.0, 1.0], [np.nan, 1.0], [np.inf, 1.0]):
        with pytest.raises(ValueError, match="weights"):
            divisor_allocation(w, [2, 2], 1)
    with pytest.raises(ValueError, match="order"):
        divisor_allocation([1.0, 1.0], [2, 2], 1, order=[0, 0])
    with pytest.raises(ValueError, match="caps"):
        divisor_allocation([1.0, 1.0], [2.0, 2.0], 1)
    with pytest.raises(ValueError, match="integers"):
        divisor_allocations([1.0, 1.0], [2, 2], [1.5])


def test_proportional_is_the_cuts_rule_byte_for_byte():
    rng = np.random.default_rng(3)
    sizes = np.concatenate([[0, 1, 2, 5, 15, 25], rng.integers(0, 5000, 50)])
    spec = HistogramSpec.for_groups(len(sizes))
    hist = np.zeros((len(sizes), spec.bins), np.int64)
    hist[:, 7] = sizes
    for edges in (band_edges(0.7, 0.1), band_edges(0.6, 0.2), [0.0, 0.25, 0.5, 1.0]):
        got = Proportional().allocate(sizes, edges, None, 0)
        assert got.dtype == np.int64 and got.tobytes() == plan_cuts(hist, spec, edges).n_keep.tobytes()


def test_capped_equal_matches_the_searched_cap():
    rng = np.random.default_rng(4)
    for _ in range(40):
        sizes = rng.integers(0, 30, int(rng.integers(1, 8)))
        n = int(sizes.sum())
        fractions = [b / n for b in range(n + 1)] if n else [0.0, 1.0]
        np.testing.assert_array_equal(edge_budgets(sizes, fractions), np.arange(n + 1) if n else [0, 0])
        got = CappedEqual().allocate(sizes, fractions, None, 0)
        ref = np.array([capped_equal_reference(sizes, b) for b in edge_budgets(sizes, fractions)]).T
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_array_equal(got, seat_by_seat(np.ones(len(sizes)), sizes, np.zeros_like(sizes),
                                                        np.arange(len(sizes)))[:, : got.shape[1]])


def test_capped_equal_keeps_small_clusters_whole():
    got = CappedEqual().allocate(np.array([3, 5, 100, 1000, 0]), [0.5], None, 0)[:, 0]
    assert got.tolist() == [3, 5, 100, 446, 0]  # 554 in all: the cap is 446
    got = CappedEqual().allocate(np.array([10, 10, 10, 1]), [0.5], None, 0)[:, 0]  # 16 = 1 + 5 + 5 + 5
    assert got.tolist() == [5, 5, 5, 1]


@pytest.mark.parametrize("name", ["proportional", "capped_equal", "dbp"])
def test_budgets_are_nested_bounded_and_exact(name):
    rng = np.random.default_rng(5)
    sizes = np.concatenate([[0, 0, 1, 2], rng.integers(0, 400, 60), [5000]])
    fractions = [0.0] + band_edges(0.9, 0.1) + [1.0]
    stats = random_stats(rng, sizes)
    got = BUDGETS.get(name)().allocate(sizes, fractions, stats, 0)
    assert got.shape == (len(sizes), len(fractions)) and got.dtype == np.int64
    assert (np.diff(got, axis=1) >= 0).all()
    assert (got >= 0).all() and (got <= sizes[:, None]).all()
    assert (got[sizes == 0] == 0).all()
    np.testing.assert_array_equal(got[:, 0], 0)
    np.testing.assert_array_equal(got[:, -1], sizes)
    if name == "proportional":
        np.testing.assert_array_equal(got, np.floor(np.multiply.outer(sizes, fractions) + 0.5))
    else:
        np.testing.assert_array_equal(got.sum(axis=0), np.floor(np.array(fractions) * sizes.sum() + 0.5))


@pytest.mark.parametrize("min_per_cluster", [0, 1, 3])
def test_dbp_matches_seat_by_seat_at_every_budget(min_per_cluster):
    rng = np.random.default_rng(6 + min_per_cluster)
    for _ in range(15):
        sizes = rng.integers(0, 12, int(rng.integers(1, 7)))
        stats = random_stats(rng, sizes)
        budget = DBP(temperature=float(rng.choice([0.02, 0.1, 1.0])), neighbours=2, min_per_cluster=min_per_cluster)
        floors = np.minimum(sizes, min_per_cluster)
        n = int(sizes.sum())
        fractions = [b / n for b in range(int(floors.sum()), n + 1)] if n else [0.0]
        ref = seat_by_seat(budget.weights(stats), sizes, floors, np.arange(len(sizes)))
        np.testing.assert_array_equal(budget.allocate(sizes, fractions, stats, 0), ref)


def test_dbp_needs_budgets_above_its_floors():
    stats = random_stats(np.random.default_rng(7), [5, 5, 5, 0])
    got = DBP(min_per_cluster=2).allocate(stats.sizes, [0.4, 0.7], stats, 0)
    assert (got[:3] >= 2).all() and got[3].tolist() == [0, 0]
    with pytest.raises(ValueError, match="budgets"):
        DBP(min_per_cluster=2).allocate(stats.sizes, [0.2], stats, 0)  # 3 < 6 floors


def test_dbp_weights_are_the_softmax_of_the_complexity():
    rng = np.random.default_rng(8)
    sizes = np.array([10, 0, 30, 5, 50, 7, 0, 12])
    stats = random_stats(rng, sizes)
    full = sizes > 0
    c = stats.centroids[full].astype(np.float64)
    dist = 1.0 - c @ c.T
    np.fill_diagonal(dist, np.inf)
    inter = np.sort(dist, axis=1)[:, :3].mean(axis=1)
    z = (stats.distance_sums[full] / sizes[full]) * inter / 0.05
    want = np.zeros(len(sizes))
    want[full] = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    np.testing.assert_allclose(DBP(temperature=0.05, neighbours=3).weights(stats), want, rtol=1e-5)


def test_dbp_keeps_more_of_complex_clusters_at_equal_size():
    sizes = np.full(4, 1000)
    centroids = np.eye(4, 8, dtype=np.float32)  # every centroid at distance 1 from the others
    stats = ClusterStats(sizes, sizes * np.array([0.1, 0.4, 0.2, 0.3]), centroids)
    got = DBP().allocate(sizes, [0.3, 0.5], stats, 0)
    for col in got.T:
        assert col[0] < col[2] < col[3] < col[1]
    stats = ClusterStats(sizes, sizes * np.full(4, 0.3), np.array([[1, 0], [1, 0.01], [1, -0.01], [-1, 0]],
                                                                     np.float32))
    col = DBP(neighbours=1).allocate(sizes, [0.4], stats, 0)[:, 0]  # cluster 3 is far from all: complex
    assert col[3] > max(col[:3])


def test_dbp_at_high_temperature_is_capped_equal():
    rng = np.random.default_rng(9)
    sizes = rng.integers(0, 500, 40)
    stats = random_stats(rng, sizes)
    fractions = band_edges(0.9, 0.1)
    equal = CappedEqual().allocate(sizes, fractions, None, 0)
    np.testing.assert_array_equal(DBP(temperature=1e300).allocate(sizes, fractions, stats, 0), equal)
    assert np.abs(DBP(temperature=1e6).allocate(sizes, fractions, stats, 0) - equal).max() <= 1
    assert np.abs(DBP(temperature=0.01).allocate(sizes, fractions, stats, 0) - equal).max() > 1


def test_inter_distances_against_all_pairs():
    rng = np.random.default_rng(10)
    c = rng.normal(size=(30, 8)).astype(np.float32)
    dist = 1.0 - (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float64) @ (
        c / np.linalg.norm(c, axis=1, keepdims=True)).T.astype(np.float64)
    np.fill_diagonal(dist, np.inf)
    for n in (1, 5, 29, 100):
        want = np.sort(dist, axis=1)[:, : min(n, 29)].mean(axis=1)
        np.testing.assert_allclose(inter_distances(c, n), want, atol=1e-5)
    assert inter_distances(c[:1], 20).tolist() == [0.0]
    assert inter_distances(c[:0], 20).shape == (0,)
    np.testing.assert_allclose(inter_distances(np.array([[1, 0], [0, 1]], np.float32), 20), [1.0, 1.0], atol=1e-6)
    dup = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], np.float32)  # self may rank behind a twin
    np.testing.assert_allclose(inter_distances(dup, 2), [0.0, 0.0, 0.0, 1.0], atol=1e-6)


def test_single_cluster_empty_clusters_and_extreme_fractions():
    rng = np.random.default_rng(11)
    for sizes in (np.array([7]), np.array([0, 5, 0]), np.array([0, 0]), np.array([], np.int64)):
        stats = random_stats(rng, sizes)
        for name in BUDGETS.names():
            got = BUDGETS.get(name)().allocate(sizes, [0.0, 0.5, 1.0], stats, 0)
            assert got.shape == (len(sizes), 3)
            np.testing.assert_array_equal(got[:, 0], 0)
            np.testing.assert_array_equal(got[:, 2], sizes)
            assert (got[sizes == 0] == 0).all()
            assert BUDGETS.get(name)().allocate(sizes, [], stats, 0).shape == (len(sizes), 0)


def test_registry_and_settings():
    assert {"proportional", "capped_equal", "dbp"} <= set(BUDGETS.names())
    for name in ("proportional", "capped_equal", "dbp"):
        cls = BUDGETS.get(name)
        assert issubclass(cls, Budget) and cls.name == name
    with pytest.raises(ValueError, match="unknown select.budget"):
        BUDGETS.get("nope")
    assert DBP() == DBP(temperature=0.1, neighbours=20, min_per_cluster=0)
    for bad in ({"temperature": 0.0}, {"temperature": float("inf")}, {"neighbours": 0}, {"min_per_cluster": -1}):
        with pytest.raises(ValueError):
            DBP(**bad)
    with pytest.raises(ValueError, match="fractions"):
        CappedEqual().allocate(np.array([3, 4]), [0.5, 0.2], None, 0)
    with pytest.raises(ValueError, match="fractions"):
        Proportional().allocate(np.array([3, 4]), [1.5], None, 0)
    with pytest.raises(ValueError, match="ClusterStats"):
        DBP().allocate(np.array([3, 4]), [0.5], None, 0)
    with pytest.raises(ValueError, match="centroids"):
        DBP().allocate(np.array([3, 4]), [0.5], ClusterStats(np.array([3, 4]), np.ones(2)), 0)


def test_large_k_is_vectorized():
    """k = 50,000 clusters, N = 5e8 samples: completes quickly with exact totals (no timing asserted)."""
    rng = np.random.default_rng(12)
    k = 50_000
    sizes = rng.multinomial(500_000_000, rng.dirichlet(np.full(k, 0.3)))
    sizes[:100] = 0
    fractions = band_edges(0.9, 0.1)
    budgets = edge_budgets(sizes, fractions)
    for w in (np.ones(k), rng.random(k), np.exp(rng.normal(0.0, 5.0, k))):
        got = divisor_allocations(w, sizes, budgets)
        np.testing.assert_array_equal(got.sum(axis=0), budgets)
        assert (np.diff(got, axis=1) >= 0).all() and (got <= sizes[:, None]).all()
        for e in range(len(budgets)):
            assert_divisor_optimal(w, sizes, np.zeros(k), got[:, e])
    got = CappedEqual().allocate(sizes, fractions, None, 0)
    np.testing.assert_array_equal(got.sum(axis=0), budgets)
    small = sizes[:5_000]  # the neighbour search is all pairs: dbp at a smaller k
    got = DBP().allocate(small, fractions, random_stats(rng, small, d=16), 0)
    np.testing.assert_array_equal(got.sum(axis=0), edge_budgets(small, fractions))


def test_distance_sums_reduce_to_the_same_value_in_any_grouping():
    """The select stage adds per-shard distance sums in reduce tasks, in whatever order they
    finish: in fixed point the dbp budget's inputs are the same for every grouping."""
    from prune.select.budgets import dense_sums, distance_sums
    from prune.select.cuts import fold_sparse

    rng = np.random.default_rng(3)
    blocks = [(rng.integers(0, 5, 1000), rng.uniform(0, 2, 1000).astype(np.float32)) for _ in range(9)]
    parts = [distance_sums(g, d) for g, d in blocks]
    flat = fold_sparse(parts)
    nested = fold_sparse([fold_sparse(parts[:2]), fold_sparse(parts[7:] + parts[2:4]), fold_sparse(parts[4:7])])
    assert np.array_equal(flat[0], nested[0]) and np.array_equal(flat[1], nested[1])
    exact = np.bincount(np.concatenate([g for g, _ in blocks]),
                        weights=np.concatenate([d for _, d in blocks]).astype(np.float64), minlength=5)
    assert np.allclose(dense_sums(flat, 5), exact, rtol=0, atol=1e-5)
