"""Spherical k-means with faiss: recovers separated clusters; the score is 1 - cosine."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from prune.cluster.kmeans import (
    Assigner,
    assign,
    default_k,
    fit_spherical_kmeans,
    l2_normalize,
    prototype_distance,
)

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def sphere_clusters(k=8, per=150, d=32, spread=0.15, seed=0):
    """k random unit directions, points scattered around each and projected to the sphere."""
    rng = np.random.default_rng(seed)
    centers = l2_normalize(rng.normal(size=(k, d)))
    labels = np.repeat(np.arange(k), per)
    x = centers[labels] + spread * rng.normal(size=(k * per, d)) / np.sqrt(d)
    x *= rng.uniform(0.5, 3.0, size=(len(x), 1))  # any norm: the fit normalizes
    perm = rng.permutation(len(x))
    return x[perm].astype(np.float32), labels[perm], centers


def test_recovers_well_separated_clusters():
    """faiss seeds Lloyd's with random points (no k-means++), so at k = the true count a run
    often parks two centroids in one cluster and merges two others (36 of 40 seeds with
    nredo=1 in a probe). With k a few times the true count, as the paper's rule of thumb
    allows, every centroid is pure and every true cluster is covered (40 of 40, nredo=3)."""
    x, labels, centers = sphere_clusters(k=8)
    centroids, meta = fit_spherical_kmeans(x, k=24, niter=25, nredo=3, seed=0)
    assert centroids.shape == (24, 32) and centroids.dtype == np.float32
    cluster, cos = assign(x, centroids)
    owner = {}
    for j in np.unique(cluster):  # every used centroid holds points of one true cluster only
        found = np.unique(labels[cluster == j])
        assert len(found) == 1, f"centroid {j} mixes true clusters {found}"
        owner[int(j)] = int(found[0])
        assert float(centroids[j] @ centers[found[0]]) > 0.99  # and sits on that cluster's center
    assert sorted(set(owner.values())) == list(range(8))  # every true cluster is found
    assert meta["k"] == 24 and meta["k_requested"] == 24 and meta["dim"] == 32 and meta["n_fit"] == len(x)
    assert 0 < meta["mean_distance_fit"] < 0.05
    assert meta["mean_distance_fit"] == pytest.approx(float(np.mean(1 - cos)), rel=1e-5)


def test_recovers_clusters_one_to_one_with_restarts():
    """At k = the true count, restarts pick the run with the best objective."""
    x, labels, centers = sphere_clusters(k=4, per=200, seed=6)
    centroids, _ = fit_spherical_kmeans(x, k=4, niter=25, nredo=20, seed=0)
    cluster, _ = assign(x, centroids)
    mapping = {}
    for c in range(4):
        found = np.unique(cluster[labels == c])
        assert len(found) == 1, f"true cluster {c} split over {found}"
        mapping[c] = int(found[0])
        assert float(centroids[mapping[c]] @ centers[c]) > 0.99
    assert len(set(mapping.values())) == 4


def test_centroids_unit_norm():
    x, _, _ = sphere_clusters(k=5, d=16, spread=0.8, seed=1)
    centroids, _ = fit_spherical_kmeans(x, k=12, seed=0)
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)


def test_same_seed_same_centroids_other_seed_other_init():
    x, _, _ = sphere_clusters(k=6, d=16, spread=1.5, seed=2)  # overlapping: init matters
    a, _ = fit_spherical_kmeans(x, k=10, niter=5, seed=7)
    b, _ = fit_spherical_kmeans(x, k=10, niter=5, seed=7)
    c, _ = fit_spherical_kmeans(x, k=10, niter=5, seed=8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_k_larger_than_n_is_clamped():
    x, _, _ = sphere_clusters(k=2, per=3, d=8, seed=3)
    centroids, meta = fit_spherical_kmeans(x, k=50, niter=3)
    assert centroids.shape == (6, 8)
    assert meta["k"] == 6 and meta["k_requested"] == 50
    # with one centroid per point, every point is its own prototype
    _, cos = assign(x, centroids)
    assert np.allclose(cos, 1.0, atol=1e-5)


def test_no_samples_is_an_error():
    with pytest.raises(ValueError, match="no successfully embedded samples"):
        fit_spherical_kmeans(np.zeros((0, 8), np.float32), k=4)


def test_assigner_distance_is_one_minus_numpy_cosine():
    rng = np.random.default_rng(4)
    centroids = rng.normal(size=(7, 24)).astype(np.float32) * 3.0  # not normalized on purpose
    x = rng.normal(size=(500, 24)).astype(np.float32) * rng.uniform(0.1, 10, size=(500, 1)).astype(np.float32)
    cluster, cos = Assigner(centroids)(x)
    assert cluster.dtype == np.int32 and cos.dtype == np.float32
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    cn = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    sims = xn.astype(np.float64) @ cn.T.astype(np.float64)
    best = sims.argmax(axis=1)
    top2 = np.sort(sims, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-5  # skip near-ties, where float32 may pick either
    assert clear.mean() > 0.95
    assert np.array_equal(cluster[clear], best[clear])
    np.testing.assert_allclose(cos, sims.max(axis=1), atol=1e-5)
    dist = prototype_distance(cos)
    assert dist.dtype == np.float32
    np.testing.assert_allclose(dist, 1.0 - sims.max(axis=1), atol=1e-5)
    assert ((dist >= 0) & (dist <= 2)).all()


def test_assigner_empty_batch_and_reuse():
    rng = np.random.default_rng(5)
    a = Assigner(rng.normal(size=(3, 4)).astype(np.float32))
    cluster, cos = a(np.zeros((0, 4), np.float32))
    assert cluster.shape == cos.shape == (0,)
    x = rng.normal(size=(10, 4)).astype(np.float32)
    first = a(x)
    assert np.array_equal(a(x)[0], first[0])  # the index is not changed by a search


def test_prototype_distance_clips_rounding():
    cos = np.array([1.0000001, 1.0, 0.0, -1.0, -1.0000001], np.float32)
    d = prototype_distance(cos)
    assert d.min() >= 0.0 and d.max() <= 2.0
    np.testing.assert_allclose(d, [0.0, 0.0, 1.0, 2.0, 2.0], atol=1e-6)


def test_l2_normalize_zero_rows_stay_finite():
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    y = l2_normalize(x)
    assert y.dtype == np.float32 and np.isfinite(y).all()
    np.testing.assert_allclose(y[0], [0.6, 0.8], rtol=1e-6)


@pytest.mark.parametrize(
    "n_ok, expected",
    [
        (0, 10),
        (1, 10),
        (104_999, 10),  # rounds to 10
        (105_000, 10),  # round half to even: 10.5 -> 10
        (115_000, 12),  # 11.5 -> 12
        (1_000_000, 100),
        (440_000_000, 44_000),
        (999_994_999, 99_999),
        (1_000_000_000, 100_000),
        (12_800_000_000, 100_000),
    ],
)
def test_default_k_boundaries(n_ok, expected):
    assert default_k(n_ok) == expected
    assert isinstance(default_k(n_ok), int)


def test_default_k_is_monotone_and_clamped():
    ns = np.unique(np.geomspace(1, 10**11, 400).astype(np.int64))
    ks = [default_k(int(n)) for n in ns]
    assert all(b >= a for a, b in zip(ks, ks[1:]))
    assert min(ks) == 10 and max(ks) == 100_000


def _one_to_one(x, labels, centroids, k) -> bool:
    cluster, _ = assign(x, centroids)
    return len(np.unique(cluster)) == k and all(len(np.unique(cluster[labels == t])) == 1 for t in range(k))


def test_kmeans_plus_plus_init_finds_clusters_random_points_merge():
    """At k = the true count, random-point seeding merges clusters on most seeds; k-means++'s
    D²-weighted seeding spreads the seeds out (30 of 40 seeds one-to-one vs 5 of 40 in a probe)."""
    x, labels, _ = sphere_clusters(k=8)
    found = {init: sum(_one_to_one(x, labels, fit_spherical_kmeans(x, 8, seed=s, init=init)[0], 8) for s in range(10))
             for init in ("random", "kmeans++")}
    assert found["kmeans++"] >= 5 and found["kmeans++"] >= found["random"] + 3, found
    a, meta = fit_spherical_kmeans(x, 8, niter=5, seed=3, init="kmeans++")
    assert meta["init"] == "kmeans++"
    assert np.array_equal(a, fit_spherical_kmeans(x, 8, niter=5, seed=3, init="kmeans++")[0])


def test_sample_fit_metadata_names_its_convention():
    """The sample fit's objective is faiss's (sum of cos, higher is better), the refinement's is a
    sum of (1 - cos): named apart, and the old `objective` key kept for older readers."""
    x, _, _ = sphere_clusters(k=4, per=50, d=16, seed=7)
    centroids, meta = fit_spherical_kmeans(x, k=4, niter=10)
    assert meta["fit_objective_faiss"] == meta["objective"]
    _, cos = assign(x, centroids)
    # faiss's last objective is of the centroids entering its last iteration: close to, not equal to, sum(cos)
    assert meta["fit_objective_faiss"] == pytest.approx(float(np.sum(cos)), rel=1e-3)
    assert meta["mean_distance_fit"] == pytest.approx(float(np.mean(1.0 - cos)), abs=1e-6)
    assert set(meta["conventions"]) == {"fit_objective_faiss", "mean_distance_fit"}


OLD_FAISS = """
import faiss
for name in [n for n in dir(faiss) if n.startswith("ClusteringInitMethod")]:
    delattr(faiss, name)  # as faiss-cpu 1.8 had it: no init_method
import numpy as np
import prune.cluster.kmeans as km
x = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
c, meta = km.fit_spherical_kmeans(x, 4, niter=3, init="random")
assert c.shape == (4, 8) and meta["init"] == "random"
try:
    km.fit_spherical_kmeans(x, 4, niter=3, init="kmeans++")
except RuntimeError as e:
    print(e)
else:
    raise SystemExit("kmeans++ without ClusteringInitMethod did not fail")
"""


def test_imports_and_fits_on_a_faiss_without_init_methods():
    """pyproject allows faiss-cpu>=1.8, which has no ClusteringInitMethod: importing prune.cluster.kmeans and
    the default (random) fit must work there; only kmeans++ fails, saying which setting and faiss."""
    import subprocess
    import sys

    from .conftest import REPO

    r = subprocess.run([sys.executable, "-c", OLD_FAISS], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": REPO})
    assert r.returncode == 0, r.stderr
    assert "kmeans.init" in r.stdout and f"faiss {faiss.__version__}" in r.stdout and "kmeans.init: random" in r.stdout


def test_random_init_passes_nothing_to_faiss():
    from prune.cluster.kmeans import faiss_init_args

    assert faiss_init_args("random") == {}  # faiss's default, on any faiss
    assert faiss_init_args("kmeans++") == {"init_method": faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS}
    with pytest.raises(ValueError, match="forgy"):
        faiss_init_args("forgy")
