"""Settings of the prototypes: the `kmeans` section of a config."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from prune.settings import Section


class KMeansConfig(Section):
    """A faiss fit on a sample, optionally refined by distributed Lloyd passes over every embedding."""

    k: Optional[int] = Field(None, ge=1)  # None: n_ok / 10_000 clamped to [10, 100_000]
    sample_size: int = Field(200_000, ge=1)
    niter: int = Field(25, ge=1)  # Lloyd iterations of the sample fit
    nredo: int = Field(1, ge=1)
    seed: int = 0
    init: Literal["random", "kmeans++"] = "random"  # sample fit seeded by random points (faiss) or k-means++
    fit_num_cpus: Optional[int] = Field(None, ge=1)  # None: fit on the driver; n: in a Ray task with n CPUs
    refine_iters: int = Field(0, ge=0)  # Lloyd passes over all embeddings after the sample fit (0: off)
    refine_tol: float = Field(1e-4, ge=0.0)  # stop when the objective changes by at most this, relatively
    refine_shards_per_task: int = Field(1, ge=1)  # shards one refinement task reduces before returning
    # keep each refine task's embeddings in Ray's object store (float32) across passes instead of
    # re-reading Parquet every pass; None: when they take at most a quarter of the object store
    refine_cache: Optional[bool] = None
    assign_concurrency: Optional[int] = Field(None, ge=1)  # assign tasks in flight; None: max(64, 2 x the CPUs)


# settings that only place work: the exact reduce makes the centroids independent of them
PLACEMENT_ONLY = {"assign_concurrency", "refine_shards_per_task", "refine_cache"}


def kmeans_settings(k: KMeansConfig) -> dict:
    """The k-means settings the centroids depend on (what their fingerprint hashes).

    New settings left at their no-op values are left out, so runs made before they existed keep
    their fingerprint; `refine_tol` only counts when refinement is on.
    """
    s = k.model_dump(exclude=PLACEMENT_ONLY)
    if not k.refine_iters:
        del s["refine_iters"], s["refine_tol"]
    if k.init == "random":
        del s["init"]
    if k.fit_num_cpus is None:  # a fit in a task runs faiss on that many threads
        del s["fit_num_cpus"]
    return s
