"""Prototypes from settings: the sample drawn block by block, the sample fit, then the optional
Lloyd refinement over every block.

The prototypes stage and `evaluate` both call these, with the blocks (input shards) mapped their
own way (Ray tasks over embeddings files, or arrays in memory), so both fit the same prototypes
from the same embeddings.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import numpy as np

from prune.cluster import lloyd
from prune.cluster.kmeans import default_k, fit_spherical_kmeans
from prune.cluster.settings import KMeansConfig


def k_for(kc: KMeansConfig, n_ok: int) -> int:
    """The configured k, or the default that grows with the data."""
    return kc.k or default_k(n_ok)


def sample_sizes(ok_per_block: dict[str, int], sample_size: int) -> dict[str, int]:
    """How many embeddings each block gives the fit sample: its share of `sample_size`, rounded up."""
    n_ok = sum(ok_per_block.values())
    frac = min(1.0, sample_size / n_ok) if n_ok else 0.0
    return {b: int(np.ceil(n * frac)) for b, n in ok_per_block.items() if n}


def sample_block(x: np.ndarray, take: int, seed: int, block: str) -> np.ndarray:
    """A seeded subset of one block's finite embeddings (a NaN row would poison the whole fit),
    the same whichever worker draws it: the seed and the block's name choose it."""
    x = x[np.isfinite(x).all(axis=1)]
    take = min(take, len(x))
    rng = np.random.default_rng([seed, int.from_bytes(block.encode()[-8:], "little")])
    idx = np.sort(rng.choice(len(x), size=take, replace=False)) if take < len(x) else np.arange(len(x))
    return x[idx]


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
