"""The kept subsets to train on: the pool's prototypes and every policy's selection, made by the
very library functions the prototypes and select stages call (on the pool in memory), so a row of
the table is what `ssl-prune run` with that policy and keep fraction would have kept.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from prune import schema
from prune.align.cut import keep_count
from prune.cluster import lloyd
from prune.cluster import prototypes as fit
from prune.cluster.kmeans import assign, prototype_distance
from prune.cluster.settings import KMeansConfig
from prune.dedup.semdedup import dedup_cluster
from prune.dedup.settings import DedupConfig
from prune.evaluate.layout import (
    CAPTION,
    CAPTION_DESCRIBES,
    CAPTION_ORACLE,
    CAPTION_PREFIX,
    CAPTION_SUFFIX,
    CLUSTERS_COVERED,
    COPIES_KEPT,
    DEDUP_PREFIX,
    JUNK_KEPT,
    KIND_COPY,
    KIND_JUNK,
    KIND_ORIGINAL,
    MISCAPTIONED_KEPT,
    ORACLE,
    SEED_FREE,
    fraction_label,
)
from prune.select import auto as auto_rule
from prune.select import cuts
from prune.select.auto import AutoChoice
from prune.select.budgets import ClusterStats, dense_sums, distance_sums, divisor_allocations
from prune.select.policies import block_priorities, policy_class, selection_groups
from prune.select.settings import SelectConfig
from prune.select.strata import DIST_BINS, plan_strata, sparse_distance_histogram


def prototypes(
    embeddings: np.ndarray, cfg: KMeansConfig, shards: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, dict, np.ndarray]:
    """The prototypes stage's fit on the pool: the sample drawn shard by shard as the stage draws it
    (`shards`: each row's input shard; None: one block), the faiss fit, then the Lloyd refinement over
    the whole pool when `refine_iters` asks for it; -> (cluster int32, distance float32, metadata, centroids)."""
    n = len(embeddings)
    shards = np.full(n, "pool", dtype=object) if shards is None else np.asarray(shards)
    names, block_of = np.unique(shards, return_inverse=True)
    rows = {str(b): np.nonzero(block_of == i)[0] for i, b in enumerate(names)}
    takes = fit.sample_sizes({b: len(r) for b, r in rows.items()}, cfg.sample_size)
    sample = np.concatenate([fit.sample_block(embeddings[rows[b]], takes[b], cfg.seed, b) for b in sorted(takes)])
    centroids, meta = fit.fit_sample(sample, cfg, fit.k_for(cfg, n))
    centroids, meta = fit.refine(cfg, centroids, meta, lambda c: [lloyd.block_stats(embeddings, c)])
    cluster, cosine = assign(embeddings, centroids)
    meta |= {"k_default_used": cfg.k is None, "cluster_sizes": np.bincount(cluster, minlength=meta["k"]).tolist()}
    return cluster, prototype_distance(cosine), meta, centroids


def split_policy(policy: str) -> tuple[str, bool]:
    """'balanced-hard' -> ('hard', True): the select stage's policy and `balanced` flag."""
    settings = select_config(policy, 1.0, 0)
    return settings.policy, settings.balanced


def select_config(policy: str, keep_fraction: float, seed: int, **options) -> SelectConfig:
    """An evaluate policy name as the select stage's settings: 'capped-hard' -> policy hard,
    balanced, budget capped_equal; 'hard' -> global. `options`: other select settings."""
    for prefix, budget in schema.BUDGET_PREFIXES.items():
        if policy.startswith(prefix):
            return SelectConfig(keep_fraction=keep_fraction, policy=policy[len(prefix):], balanced=True,
                                budget=budget, seed=seed, **options)
    return SelectConfig(keep_fraction=keep_fraction, policy=policy, seed=seed, **options)


def select_bands(
    policy: str, keep_fractions, distance, cluster, n_clusters: int, shards, keys, seed: int,
    centroids: np.ndarray | None = None, **options,
) -> np.ndarray:
    """Band of every pool sample: index of the smallest keep fraction that keeps it (-1: none).

    The select stage's own calls, with each input shard of the pool as one block (priorities per
    shard, the budget's keep counts, `cuts.exact_cuts`, `Cuts.apply`) and the keep fractions as the
    band edges: each edge's cut is exact and budgets are nested, so `band <= i` is the selection
    `ssl-prune run` makes at fraction i. `centroids`: the prototypes, for the dbp budget.
    """
    settings = select_config(policy, 1.0, seed, **options)
    base, balanced = settings.policy, settings.balanced
    distance, cluster, shards, keys = (np.asarray(a) for a in (distance, cluster, shards, keys))
    names, shard_of = np.unique(shards, return_inverse=True)
    spec = cuts.HistogramSpec.for_groups(n_clusters if balanced else 1)
    strata = None
    if policy_class(base).uses_strata:  # the stage's pass 0, over the pool in one block
        hist = np.zeros((spec.n_groups, DIST_BINS), np.int64)
        idx, counts = sparse_distance_histogram(selection_groups(balanced, cluster), distance)
        np.add.at(hist.reshape(-1), idx, counts)
        strata = plan_strata(hist, settings.strata, settings.drop_hardest)
    blocks = []
    for i, shard in enumerate(names):
        rows = np.nonzero(shard_of == i)[0]
        prio, groups = block_priorities(base, seed, balanced, str(shard), [str(k) for k in keys[rows]],
                                        distance[rows], cluster[rows], strata)
        blocks.append((rows, prio, groups))
    edges = sorted(float(f) for f in keep_fractions)
    groups_all = np.asarray(cluster, np.int64) if balanced else np.zeros(len(keys), np.int64)
    sums = dense_sums(distance_sums(groups_all, distance), spec.n_groups)  # as the select stage adds them

    def n_keep(sizes):
        return settings.make_budget().allocate(sizes, edges, ClusterStats(sizes, sums, centroids), seed)

    found, hist = cuts.exact_cuts(
        spec, edges, (cuts.sparse_histogram(p, g, spec) for _, p, g in blocks),
        lambda window: (cuts.boundary_values(p, g, window) for _, p, g in blocks), n_keep,
        refine=lambda step: (cuts.refinement_histogram(p, g, step) for _, p, g in blocks),
    )
    band = np.full(len(keys), -1, np.int32)
    for rows, prio, groups in blocks:
        band[rows] = found.apply(prio, groups, hist)[1]
    return band


def near_duplicates(embeddings: np.ndarray, distance, cluster, shards, keys, dedup: DedupConfig) -> np.ndarray:
    """The dedup stage's rule on the pool in memory: which samples SemDeDup removes (bool [n])."""
    cluster, shards, keys, distance = (np.asarray(a) for a in (cluster, shards, keys, distance))
    removed = np.zeros(len(keys), bool)
    for c in np.unique(cluster):
        m = np.nonzero(cluster == c)[0]
        res = dedup_cluster(embeddings[m], distance[m], shards[m], keys[m], dedup.eps, dedup.keep, dedup.seed,
                            dedup.block_rows)
        removed[m] = res.removed
    return removed


def bands_after_dedup(policy: str, keep_fractions, removed: np.ndarray, distance, cluster, n_clusters: int,
                      shards, keys, seed: int, centroids=None, **options) -> np.ndarray:
    """`policy` among the samples dedup kept, for subsets of the same sizes as without dedup: the
    fraction f of the pool becomes f * n / n_kept of the survivors (all of them, when fewer)."""
    keep = ~np.asarray(removed)
    n, n_kept = len(keep), int(keep.sum())
    fractions = [min(1.0, float(f) * n / max(n_kept, 1)) for f in sorted(keep_fractions)]
    band = np.full(n, -1, np.int32)
    band[keep] = select_bands(policy, fractions, np.asarray(distance)[keep], np.asarray(cluster)[keep], n_clusters,
                              np.asarray(shards)[keep], np.asarray(keys)[keep], seed, centroids, **options)
    return band


def oracle_bands(keep_fractions, labels: np.ndarray, kinds: np.ndarray, seed: int) -> np.ndarray:
    """The ceiling no policy can reach: it sees the labels and kinds. Originals only, classes capped
    evenly (capped-equal over the classes), at random inside a class; a fraction of the pool keeps
    floor(f * n + 0.5) samples, or every original when there are fewer."""
    labels, kinds = np.asarray(labels), np.asarray(kinds)
    fractions = sorted(float(f) for f in keep_fractions)
    usable = (kinds == KIND_ORIGINAL) & (labels >= 0)
    classes, cls = np.unique(labels[usable], return_inverse=True)
    sizes = np.bincount(cls, minlength=len(classes))
    budgets = np.minimum(np.floor(np.multiply(fractions, len(labels)) + 0.5).astype(np.int64), sizes.sum())
    n_keep = divisor_allocations(np.ones(len(classes)), sizes, budgets)  # [C, E], nested
    band = np.full(len(labels), -1, np.int32)
    rows = np.nonzero(usable)[0]
    rng = np.random.default_rng(seed)
    for c in range(len(classes)):
        members = rng.permutation(rows[cls == c])
        rank = np.arange(len(members))
        clears = rank[:, None] < n_keep[c][None, :]  # [m, E]
        band[members] = np.where(clears.any(axis=1), clears.argmax(axis=1), -1)
    return band


def caption_order(scores: np.ndarray, seed: int) -> np.ndarray:
    """Pool indices, the best-agreeing pair first (the clip_score stage's order; a pair without a
    score last), equal scores in a seeded random order."""
    scores = np.asarray(scores, np.float64)
    tie = np.random.default_rng([seed, 0xCA7]).permutation(len(scores))
    return np.lexsort((tie, -np.where(np.isnan(scores), -np.inf, scores)))


def caption_top(scores: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the top `fraction` by caption agreement: as many as the clip_score stage's
    keep_top_fraction keeps (`prune.align.cut.keep_count`); pairs without a caption are taken last."""
    return np.sort(caption_order(scores, seed)[:keep_count(fraction, len(scores))])


CAPTION_FIRST_RULE = "clip_score stage: missing=remove, keep_top_fraction=caption_share"  # in caption+ rows' fingerprints


def caption_stage_survivors(scores: np.ndarray, share: float, seed: int) -> np.ndarray:
    """Sorted indices of what the clip_score stage keeps with `missing: remove` and
    `keep_top_fraction: share`: the best-agreeing `share` of the pairs that have a caption."""
    scored = np.flatnonzero(~np.isnan(np.asarray(scores, np.float64)))
    return scored[caption_top(np.asarray(scores)[scored], share, seed)]


@dataclass
class PoolSelection:
    """The pool as every policy of the grid sees it (no labels but the oracle's), and each policy's
    kept subsets: `subsets(policy, fractions, seed)` -> per fraction, the sorted pool indices kept.

    Policies compose left to right as stages do: `dedup+P` is SemDeDup of the pool, then P among
    the survivors; `caption+P` is the clip_score stage first (the best-agreeing `caption_share` of
    the captioned pairs, the rest removed), then P (which may itself dedup) among those; `P+caption` lets P pick `f / caption_share` of the pool and keeps its
    best-agreeing `caption_share`. Every subset of fraction f holds as many samples (while there
    are enough survivors), so policies are compared at the same size."""

    embeddings: np.ndarray
    distance: np.ndarray
    cluster: np.ndarray
    k: int
    shards: np.ndarray
    keys: np.ndarray
    centroids: np.ndarray
    labels: np.ndarray
    kinds: np.ndarray
    clip_scores: Optional[np.ndarray]  # None: the pool has no caption scores (caption policies refused)
    caption_kinds: Optional[np.ndarray] = None  # what each json says of its caption (the caption oracle's)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    caption_share: float = 0.7
    options: dict = field(default_factory=dict)  # the select settings every policy shares
    auto_tail_ratio: float = 3.1  # policy auto's threshold (select.auto_tail_ratio)
    _removed: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, idx: np.ndarray) -> "PoolSelection":
        pick = lambda a: None if a is None else np.asarray(a)[idx]  # noqa: E731
        return PoolSelection(self.embeddings[idx], pick(self.distance), pick(self.cluster), self.k, pick(self.shards),
                             pick(self.keys), self.centroids, pick(self.labels), pick(self.kinds),
                             pick(self.clip_scores), pick(self.caption_kinds), self.dedup, self.caption_share, self.options,
                             self.auto_tail_ratio)

    def removed(self) -> np.ndarray:
        """What SemDeDup removes from this pool (computed once)."""
        if self._removed is None:
            self._removed = near_duplicates(self.embeddings, self.distance, self.cluster, self.shards, self.keys,
                                            self.dedup)
        return self._removed

    def scores(self) -> np.ndarray:
        if self.clip_scores is None:
            raise ValueError("a caption policy needs each pair's clip score: embed the pool with embed.text")
        return self.clip_scores

    def auto_choice(self) -> AutoChoice:
        """What `select.policy: auto` picks for this pool (the run's statistic: every sample's distance)."""
        return auto_rule.choose(auto_rule.distance_histogram(self.distance), self.auto_tail_ratio)

    def resolve(self, policy: str) -> str:
        """`auto` in a policy name replaced by the evaluate name of the rule it picks here
        (dedup+auto -> dedup+random on a clean pool, dedup+dbp-hard on a web-like one)."""
        parts = policy.split("+")
        if auto_rule.AUTO not in parts:
            return policy
        settings = self.auto_choice().settings
        prefix = next((p for p, b in schema.BUDGET_PREFIXES.items() if settings.get("balanced")
                       and b == settings.get("budget")), "")
        return "+".join(prefix + settings["policy"] if p == auto_rule.AUTO else p for p in parts)

    def subsets(self, policy: str, fractions, seed: int) -> list[np.ndarray]:
        fractions = [float(f) for f in fractions]
        policy = self.resolve(policy)
        n = len(self)
        if policy == CAPTION:
            return [caption_top(self.scores(), f, seed) for f in fractions]
        if policy.startswith(CAPTION_PREFIX):
            survivors = caption_stage_survivors(self.scores(), self.caption_share, seed)
            inner = self.take(survivors)
            within = _unique_fractions(lambda fs: inner.subsets(policy[len(CAPTION_PREFIX):], fs, seed),
                                       [min(1.0, f * n / max(len(survivors), 1)) for f in fractions])
            return [survivors[i] for i in within]
        if policy.endswith(CAPTION_SUFFIX):
            picks = _unique_fractions(lambda fs: self.subsets(policy[: -len(CAPTION_SUFFIX)], fs, seed),
                                      [min(1.0, f / self.caption_share) for f in fractions])
            return [np.sort(pick[caption_order(self.scores()[pick], seed)[:min(len(pick), keep_count(f, n))]])
                    for pick, f in zip(picks, fractions)]
        order = np.argsort(fractions, kind="stable")  # the band functions want the edges ascending
        edges = [fractions[i] for i in order]
        if policy == ORACLE:
            bands = oracle_bands(edges, self.labels, self.kinds, seed)
        elif policy == CAPTION_ORACLE:
            if self.caption_kinds is None or all(k is None for k in self.caption_kinds):
                raise ValueError("caption-oracle needs each sample's caption kind in its json (demo-data --web-like writes it)")
            describes = np.asarray(self.caption_kinds, dtype=object) == CAPTION_DESCRIBES
            bands = oracle_bands(edges, self.labels, np.where(describes, self.kinds, "miscaptioned"), seed)
        elif policy.startswith(DEDUP_PREFIX):
            bands = bands_after_dedup(policy[len(DEDUP_PREFIX):], edges, self.removed(), self.distance, self.cluster,
                                      self.k, self.shards, self.keys, seed, self.centroids, **self.options)
        else:
            bands = select_bands(policy, edges, self.distance, self.cluster, self.k, self.shards, self.keys, seed,
                                 self.centroids, **self.options)
        out: list = [None] * len(fractions)
        for rank, i in enumerate(order):
            out[i] = kept_indices(bands, rank)
        return out


def _unique_fractions(select, fractions: list[float]) -> list[np.ndarray]:
    """`select` called once on the distinct fractions (the band functions want distinct edges),
    its subsets handed back in the order of `fractions`."""
    distinct = sorted(set(fractions))
    got = dict(zip(distinct, select(distinct)))
    return [got[f] for f in fractions]


def subset_stats(idx: np.ndarray, kinds: np.ndarray, cluster: np.ndarray, caption_kinds=None) -> dict:
    """What a kept subset holds beside its size: its share of the pool's copies and junk (and, where
    the json says what each caption is, of its captions that do not describe their image), the
    clusters it covers."""
    kinds = np.asarray(kinds)
    out = {MISCAPTIONED_KEPT: float("nan")}
    if caption_kinds is not None:
        said = np.array([k is not None for k in caption_kinds])
        bad = said & (np.asarray(caption_kinds, dtype=object) != CAPTION_DESCRIBES)
        if bad.any():
            out[MISCAPTIONED_KEPT] = float(bad[idx].sum() / bad.sum())
    for column, kind in ((COPIES_KEPT, KIND_COPY), (JUNK_KEPT, KIND_JUNK)):
        total = int((kinds == kind).sum())
        out[column] = float((kinds[idx] == kind).sum() / total) if total else float("nan")
    out[CLUSTERS_COVERED] = float(len(np.unique(np.asarray(cluster)[idx])))
    return out


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


def plan_runs(classifiers, policies, keep_fractions, seeds, bands: dict[tuple[str, int], np.ndarray | list]) -> list[RunGroup]:
    """Every (classifier, policy, fraction, seed), grouped by identical training subsets.

    `bands[(policy, seed)]` is that selection's `select_bands`, or its kept indices per fraction
    (ascending fractions; `PoolSelection.subsets`). Keep fraction 1.0 is the whole
    pool under every policy, so it is trained once per (classifier, seed) and shared; the linear
    probe, which the seed does not change, is trained once per subset whatever the seed.
    """
    fractions = sorted(keep_fractions)
    groups: dict[tuple, RunGroup] = {}
    for clf in classifiers:
        for seed in seeds:
            for policy in policies:
                for i, f in enumerate(fractions):
                    sel = bands[(policy, seed)]
                    idx = kept_indices(sel, i) if isinstance(sel, np.ndarray) else np.asarray(sel[i], np.int64)
                    digest = hashlib.sha256(idx.astype(np.int64).tobytes()).hexdigest()
                    spec = RunSpec(clf, policy, float(f), int(seed))
                    key = (clf, digest) if clf in SEED_FREE else (clf, seed, digest)
                    group = groups.setdefault(key, RunGroup([], idx))
                    group.specs.append(spec)
    return list(groups.values())
