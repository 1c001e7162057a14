"""Settings of the prototypes: the `kmeans` section of a config."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field

from prune.settings import PLACEMENT, Section, counted_when

# settings added after outputs existed count only away from their no-op values, so those outputs
# keep their fingerprint; the placement settings leave the centroids as they are (the exact reduce)
_REFINING = counted_when(lambda k: bool(k.refine_iters))


class KMeansConfig(Section):
    """A faiss fit on a sample, optionally refined by distributed Lloyd passes over every embedding."""

    k: Optional[int] = Field(None, ge=1)  # None: n_ok / 10_000 clamped to [10, 100_000]
    sample_size: int = Field(200_000, ge=1)  # embeddings the sample fit runs on, drawn evenly from every shard
    niter: int = Field(25, ge=1)  # Lloyd iterations of the sample fit
    nredo: int = Field(1, ge=1)  # sample fits from different seeds; the best objective is kept (faiss)
    seed: int = 0  # the sample drawn and the fit's seeding
    # sample fit seeded by random points (faiss) or k-means++
    init: Annotated[Literal["random", "kmeans++"], counted_when(lambda k: k.init != "random")] = "random"
    # None: fit on the driver; n: in a Ray task with n CPUs (faiss then runs on that many threads)
    fit_num_cpus: Annotated[Optional[int], counted_when(lambda k: k.fit_num_cpus is not None)] = Field(None, ge=1)
    refine_iters: Annotated[int, _REFINING] = Field(0, ge=0)  # Lloyd passes over all embeddings after the sample fit (0: off)
    refine_tol: Annotated[float, _REFINING] = Field(1e-4, ge=0.0)  # stop when the objective changes by at most this, relatively
    refine_shards_per_task: Annotated[int, PLACEMENT] = Field(1, ge=1)  # shards one refinement task reduces before returning
    # keep each refine task's embeddings in Ray's object store (float32) across passes instead of
    # re-reading Parquet every pass; None: when they take at most a quarter of the object store
    refine_cache: Annotated[Optional[bool], PLACEMENT] = None
    # assign tasks in flight; None: max(64, 2 x the CPUs)
    assign_concurrency: Annotated[Optional[int], PLACEMENT] = Field(None, ge=1)
