"""Prototypes from settings: the sample fit, then the optional Lloyd refinement over every block.

The prototypes stage and `evaluate` both call these, with the blocks mapped their own way
(Ray tasks over embeddings files, or arrays in memory), so both fit the same prototypes.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import numpy as np

from prune.cluster import lloyd
from prune.cluster.kmeans import fit_spherical_kmeans
from prune.cluster.settings import KMeansConfig


def fit_sample(sample: np.ndarray, kc: KMeansConfig, k: int) -> tuple[np.ndarray, dict]:
    """faiss spherical k-means on the sample (its first `sample_size` rows) -> (centroids, metadata)."""
    return fit_spherical_kmeans(sample[: kc.sample_size], k, kc.niter, kc.nredo, kc.seed, init=kc.init)


def refine(
    kc: KMeansConfig,
    centroids: np.ndarray,
    meta: dict,
    map_blocks: Callable[[np.ndarray], Iterable[lloyd.BlockStats]],
    on_iteration: Optional[Callable[[dict], None]] = None,
    **refine_fields,
) -> tuple[np.ndarray, dict]:
    """`kc.refine_iters` Lloyd passes (`map_blocks(centroids)` yields every block's statistics);
    -> (centroids, metadata with the refinement log under `refine`). No-op when refinement is off."""
    if not kc.refine_iters:
        return centroids, meta
    centroids, log = lloyd.refine(centroids, map_blocks, kc.refine_iters, kc.refine_tol, on_iteration)
    meta = meta | {"refine": log | refine_fields, "mean_distance_all": log["mean_distance_all"]}
    meta["conventions"] = meta.get("conventions", {}) | {
        "mean_distance_all": "refinement: mean over all ok embeddings of (1 - cos) to the nearest centroid, "
        "of the centroids refine.final_objective_centroids names",
        "refine.final_objective": "refinement: sum over all ok embeddings of (1 - cos), lower is better "
        "(as refine.log[].objective; faiss's convention is n - this)",
    }
    return centroids, meta
