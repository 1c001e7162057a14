"""The kept subsets to train on: the pool's prototypes and every policy's selection, made by the
very library functions the prototypes and select stages call (on the pool in memory), so a row of
the table is what `ssl-prune run` with that policy and keep fraction would have kept.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from prune.cluster import lloyd
from prune.cluster import prototypes as fit
from prune.cluster.kmeans import assign, default_k, prototype_distance
from prune.cluster.settings import KMeansConfig
from prune.evaluate.layout import BALANCED_PREFIX, SEED_FREE, fraction_label
from prune.select import cuts
from prune.select.policies import block_priorities


def prototypes(embeddings: np.ndarray, cfg: KMeansConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """Spherical k-means on the pool (a seeded sample of `sample_size` when larger), then the
    Lloyd refinement over the whole pool when `refine_iters` asks for it (the pool is one block),
    as the prototypes stage does; -> (cluster int32, distance float32 = 1 - cosine, metadata)."""
    n = len(embeddings)
    fit_rows = np.arange(n)
    if n > cfg.sample_size:
        fit_rows = np.sort(np.random.default_rng(cfg.seed).choice(n, size=cfg.sample_size, replace=False))
    k = cfg.k or default_k(n)
    centroids, meta = fit.fit_sample(embeddings[fit_rows], cfg, k)
    centroids, meta = fit.refine(cfg, centroids, meta, lambda c: [lloyd.block_stats(embeddings, c)])
    cluster, cosine = assign(embeddings, centroids)
    meta |= {"k_default_used": cfg.k is None, "cluster_sizes": np.bincount(cluster, minlength=meta["k"]).tolist()}
    return cluster, prototype_distance(cosine), meta


def split_policy(policy: str) -> tuple[str, bool]:
    """'balanced-hard' -> ('hard', True): the select stage's policy and `balanced` flag."""
    balanced = policy.startswith(BALANCED_PREFIX)
    return (policy[len(BALANCED_PREFIX):] if balanced else policy), balanced


def select_bands(
    policy: str, keep_fractions, distance, cluster, n_clusters: int, shards, keys, seed: int
) -> np.ndarray:
    """Band of every pool sample: index of the smallest keep fraction that keeps it (-1: none).

    The select stage's own calls, with each input shard of the pool as one block (priorities per
    shard, `cuts.exact_cuts`, `Cuts.apply`) and the keep fractions as the band edges: each edge's
    cut is exact and independent, so `band <= i` is the selection `ssl-prune run` makes at fraction i.
    """
    base, balanced = split_policy(policy)
    distance, cluster, shards, keys = (np.asarray(a) for a in (distance, cluster, shards, keys))
    names, shard_of = np.unique(shards, return_inverse=True)
    blocks = []
    for i, shard in enumerate(names):
        rows = np.nonzero(shard_of == i)[0]
        prio, groups = block_priorities(base, seed, balanced, str(shard), [str(k) for k in keys[rows]],
                                        distance[rows], cluster[rows])
        blocks.append((rows, prio, groups))
    spec = cuts.HistogramSpec.for_groups(n_clusters if balanced else 1)
    edges = sorted(float(f) for f in keep_fractions)
    found, hist = cuts.exact_cuts(
        spec, edges, (cuts.sparse_histogram(p, g, spec) for _, p, g in blocks),
        lambda plan: (cuts.boundary_values(p, g, plan) for _, p, g in blocks),
    )
    band = np.full(len(keys), -1, np.int32)
    for rows, prio, groups in blocks:
        band[rows] = found.apply(prio, groups, hist)[1]
    return band


def kept_indices(bands: np.ndarray, fraction_index: int) -> np.ndarray:
    return np.nonzero((bands >= 0) & (bands <= fraction_index))[0]


@dataclass(frozen=True)
class RunSpec:
    classifier: str
    policy: str
    keep_fraction: float
    seed: int

    @property
    def tag(self) -> str:
        return f"{self.policy}@{fraction_label(self.keep_fraction)}"


@dataclass
class RunGroup:
    """Rows that train the same classifier on the same subset with the same seed: one training."""

    specs: list[RunSpec]
    train_idx: np.ndarray  # pool indices of the kept subset

    @property
    def lead(self) -> RunSpec:
        return self.specs[0]


def plan_runs(classifiers, policies, keep_fractions, seeds, bands: dict[tuple[str, int], np.ndarray]) -> list[RunGroup]:
    """Every (classifier, policy, fraction, seed), grouped by identical training subsets.

    `bands[(policy, seed)]` is that selection's `select_bands`. Keep fraction 1.0 is the whole
    pool under every policy, so it is trained once per (classifier, seed) and shared; the linear
    probe, which the seed does not change, is trained once per subset whatever the seed.
    """
    fractions = sorted(keep_fractions)
    groups: dict[tuple, RunGroup] = {}
    for clf in classifiers:
        for seed in seeds:
            for policy in policies:
                for i, f in enumerate(fractions):
                    idx = kept_indices(bands[(policy, seed)], i)
                    digest = hashlib.sha256(idx.astype(np.int64).tobytes()).hexdigest()
                    spec = RunSpec(clf, policy, float(f), int(seed))
                    key = (clf, digest) if clf in SEED_FREE else (clf, seed, digest)
                    group = groups.setdefault(key, RunGroup([], idx))
                    group.specs.append(spec)
    return list(groups.values())
