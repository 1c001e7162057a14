"""Spherical k-means prototypes with faiss, and the prototype score.

Fitting runs on a sample; assignment is a nearest-centroid search by inner product, which
for unit vectors is the cosine, so the score is exactly 1 - cos(x, nearest prototype).
"""

from __future__ import annotations

import math

import faiss
import numpy as np


def default_k(n_ok: int) -> int:
    """k that grows with the data: one prototype per 10,000 samples, clamped to [10, 100,000].

    In line with the anchors: SemDeDup's 50k centroids on 440M, DataComp's 100k on 12.8B;
    and k ≈ 10 on small sets, within an order of magnitude of most labelled datasets.
    """
    return int(min(100_000, max(10, round(n_ok / 10_000))))


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


INIT_METHODS = ("random", "kmeans++")  # how faiss seeds Lloyd's on the sample


def faiss_init_args(init: str) -> dict:
    """faiss.Kmeans keyword for `init`: "random" is faiss's default (k distinct sample points),
    so nothing is passed and any faiss works; "kmeans++" (D²-weighted, O(n·k·d) extra work) needs
    faiss's `ClusteringInitMethod`, which older faiss (pyproject allows faiss-cpu>=1.8) lacks."""
    if init == "random":
        return {}
    if init == "kmeans++":
        method = getattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS", None)
        if method is None:
            raise RuntimeError(
                f"kmeans.init: kmeans++ needs faiss's ClusteringInitMethod, which faiss {faiss.__version__} "
                "lacks: upgrade faiss-cpu, or set kmeans.init: random (faiss's random-point seeding)"
            )
        return {"init_method": method}
    raise ValueError(f"kmeans init {init!r}: expected one of {INIT_METHODS}")


def fit_spherical_kmeans(
    sample: np.ndarray, k: int, niter: int = 25, nredo: int = 1, seed: int = 0, init: str = "random"
) -> tuple[np.ndarray, dict]:
    """Fit k unit-norm centroids on `sample` [n, d]; returns (centroids, metadata).

    `init` picks faiss's seeding: "random" points, or "kmeans++" (fewer merged/split clusters
    when k is near the true count, at O(n·k·d) cost before the first iteration).
    """
    init_args = faiss_init_args(init)  # before any work: an init this faiss lacks fails fast
    x = l2_normalize(sample)
    n, d = x.shape
    if n == 0:
        raise ValueError("cannot fit prototypes: no successfully embedded samples")
    k_used = min(k, n)
    km = faiss.Kmeans(
        d,
        k_used,
        niter=niter,
        nredo=nredo,
        spherical=True,
        seed=seed,
        verbose=False,
        min_points_per_centroid=1,
        max_points_per_centroid=max(256, math.ceil(n / k_used) + 1),  # use the whole sample
        **init_args,
    )
    km.train(x)
    centroids = l2_normalize(km.centroids)
    faiss_obj = float(km.obj[-1]) if len(km.obj) else None
    meta = {
        "k": k_used,
        "k_requested": k,
        "dim": d,
        "iterations": niter,
        "nredo": nredo,
        "seed": seed,
        "init": init,
        "n_fit": n,
        # faiss's convention, on the fit sample only: sum of cos (higher is better), of the centroids
        # entering faiss's last iteration; the refinement's objectives are sums of (1 - cos)
        "fit_objective_faiss": faiss_obj,
        "objective": faiss_obj,  # the same, under its old key (kept for readers of older kmeans.json)
        "mean_distance_fit": float(np.mean(1.0 - assign(x, centroids)[1])) if n else None,
        "faiss_version": faiss.__version__,
        "conventions": {
            "fit_objective_faiss": "sample fit: faiss's objective, sum over the fit sample of cos(x, nearest centroid); "
            "higher is better (`objective` is the same value, old key)",
            "mean_distance_fit": "sample fit: mean over the fit sample of (1 - cos) to the sample-fit centroids",
        },
    }
    return centroids, meta


def centroid_index(centroids: np.ndarray) -> faiss.IndexFlatIP:
    """Exact inner-product search over unit centroids: the nearest is the largest cosine."""
    c = l2_normalize(centroids)
    index = faiss.IndexFlatIP(c.shape[1])
    index.add(c)
    return index


class Assigner:
    """Holds the centroids in a faiss index; one per worker, reused for every block."""

    def __init__(self, centroids: np.ndarray):
        self.index = centroid_index(centroids)

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-> (cluster int32 [n], cosine similarity float32 [n])."""
        if len(x) == 0:
            return np.zeros(0, np.int32), np.zeros(0, np.float32)
        sims, ids = self.index.search(l2_normalize(x), 1)
        return ids[:, 0].astype(np.int32), sims[:, 0].astype(np.float32)


def assign(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return Assigner(centroids)(x)


def prototype_distance(cosine: np.ndarray) -> np.ndarray:
    """The score: 1 - cosine to the nearest prototype, clipped to its range [0, 2]."""
    return np.clip(1.0 - cosine, 0.0, 2.0).astype(np.float32)
