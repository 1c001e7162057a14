"""Per-shard summaries of the scores, small enough to merge on the driver whatever the run's size:
distance histograms of kept and pruned samples, per-cluster counts, and for a few chosen clusters
their nearest, farthest and a random few members."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from prune import schema
from prune.select.policies import seeded_hash

DIST_EDGES = np.linspace(0.0, 2.0, 2001)  # 1 - cosine lies in [0, 2]; the plot regroups the used range
PER_KIND = 6  # images per cluster and kind in the grids


@dataclass
class Counts:
    """Pass 1, per shard then merged: histograms and per-cluster totals."""

    kept_hist: np.ndarray = field(default_factory=lambda: np.zeros(len(DIST_EDGES) - 1, np.int64))
    pruned_hist: np.ndarray = field(default_factory=lambda: np.zeros(len(DIST_EDGES) - 1, np.int64))
    removed_hist: np.ndarray = field(default_factory=lambda: np.zeros(len(DIST_EDGES) - 1, np.int64))
    cluster_total: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # embedded and assigned
    cluster_kept: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    cluster_removed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # by a curation stage

    def merge(self, other: "Counts") -> "Counts":
        k = max(len(self.cluster_total), len(other.cluster_total))
        pad = lambda a: np.pad(a, (0, k - len(a)))  # noqa: E731
        return Counts(self.kept_hist + other.kept_hist, self.pruned_hist + other.pruned_hist,
                      self.removed_hist + other.removed_hist,
                      pad(self.cluster_total) + pad(other.cluster_total), pad(self.cluster_kept) + pad(other.cluster_kept),
                      pad(self.cluster_removed) + pad(other.cluster_removed))


def shard_counts(scores: pa.Table, k: int) -> Counts:
    """One scores table -> its Counts: the samples that were assigned a cluster, kept, pruned or
    removed by a curation stage (the failures are counted in the manifest)."""
    status = scores.column(schema.STATUS).to_numpy(zero_copy_only=False)
    removed = schema.is_removal(status)
    assigned = (status == schema.STATUS_OK) | removed
    dist = scores.column(schema.DISTANCE).to_numpy(zero_copy_only=False)[assigned].astype(np.float64)
    keep = scores.column(schema.KEEP).to_numpy(zero_copy_only=False)[assigned].astype(bool)
    cluster = scores.column(schema.CLUSTER).to_numpy()[assigned]
    removed = removed[assigned]
    pruned = ~keep & ~removed
    return Counts(np.histogram(dist[keep], DIST_EDGES)[0], np.histogram(dist[pruned], DIST_EDGES)[0],
                  np.histogram(dist[removed], DIST_EDGES)[0], np.bincount(cluster, minlength=k),
                  np.bincount(cluster[keep], minlength=k), np.bincount(cluster[removed], minlength=k))


def chosen_clusters(total: np.ndarray, n: int = 8) -> list[int]:
    """The clusters the grids show: `n` spread evenly over the size order, largest first."""
    order = [int(c) for c in np.argsort(-total, kind="stable") if total[c] > 0]
    if len(order) <= n:
        return order
    return [order[i] for i in np.unique(np.linspace(0, len(order) - 1, n).round().astype(int))]


@dataclass(frozen=True)
class Pick:
    """A member shown in a grid: where to read it and how it ranks."""

    cluster: int
    kind: str  # "nearest", "farthest" or "random"
    rank: float  # smaller first within its kind
    shard: str
    key: str
    distance: float
    kept: bool


def shard_picks(shard: str, scores: pa.Table, clusters: list[int], per_kind: int = PER_KIND) -> list[Pick]:
    """This shard's candidates for the grids of `clusters`: at most `per_kind` of each kind each."""
    ok = scores.column(schema.STATUS).to_numpy(zero_copy_only=False) == schema.STATUS_OK
    cluster = scores.column(schema.CLUSTER).to_numpy()
    dist = scores.column(schema.DISTANCE).to_numpy(zero_copy_only=False)
    keys = scores.column(schema.KEY).to_numpy(zero_copy_only=False)
    keep = scores.column(schema.KEEP).to_numpy(zero_copy_only=False)
    picks = []
    for c in clusters:
        rows = np.nonzero(ok & (cluster == c))[0]
        if not len(rows):
            continue
        for kind, rank in (("nearest", dist[rows]), ("farthest", -dist[rows].astype(np.float64)),
                           ("random", seeded_hash(0, "", keys[rows].astype(str), b"report").astype(np.float64))):
            for i in np.argsort(rank, kind="stable")[:per_kind]:
                r = rows[i]
                picks.append(Pick(c, kind, float(rank[i]), shard, str(keys[r]), float(dist[r]), bool(keep[r])))
    return picks


def best_picks(picks: list[Pick], per_kind: int = PER_KIND) -> list[Pick]:
    """Merge the shards' candidates: the first `per_kind` of each cluster and kind."""
    out = []
    by = {}
    for p in picks:
        by.setdefault((p.cluster, p.kind), []).append(p)
    for group in by.values():
        out += sorted(group, key=lambda p: (p.rank, p.shard, p.key))[:per_kind]
    return out


@dataclass(frozen=True)
class DuplicateGroup:
    """A near-duplicate group dedup removed: the member kept and a few it removed."""

    kept_shard: str
    kept_key: str
    removed: tuple  # ((shard, key, similarity), ...)
    n_removed: int


def duplicate_groups(shard: str, dedup: pa.Table, n: int = 4, per_group: int = 5) -> list[DuplicateGroup]:
    """This shard's largest removed groups (by the kept member they duplicate)."""
    if len(dedup) == 0:
        return []
    target = list(zip(dedup.column(schema.DUPLICATE_OF_SHARD).to_pylist(), dedup.column(schema.DUPLICATE_OF).to_pylist()))
    keys = dedup.column(schema.KEY).to_pylist()
    sims = dedup.column(schema.SIMILARITY).to_pylist()
    groups = {}
    for t, key, sim in zip(target, keys, sims):
        groups.setdefault(t, []).append((shard, key, float(sim)))
    largest = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:n]
    return [DuplicateGroup(t[0], t[1], tuple(m[:per_group]), len(m)) for t, m in largest]


SCORE_EDGES = np.linspace(-1.0, 1.0, 401)  # caption-image cosine
LOWEST = 12  # the lowest-agreeing pairs the report shows


@dataclass
class Alignment:
    """With embed.text: the clip score of kept, pruned and removed samples, and the lowest pairs."""

    hists: dict = field(default_factory=dict)  # "kept" | "pruned" | "low_alignment" | "removed (other)" -> counts
    without_caption: int = 0
    lowest: list = field(default_factory=list)  # [(score, shard, key, status, kept)], lowest first

    def merge(self, other: "Alignment") -> "Alignment":
        hists = {k: self.hists.get(k, 0) + other.hists.get(k, 0) for k in {*self.hists, *other.hists}}
        return Alignment(hists, self.without_caption + other.without_caption,
                         sorted(self.lowest + other.lowest)[:LOWEST])


def shard_alignment(shard: str, scores: pa.Table, clip_score: np.ndarray) -> Alignment:
    """One shard's scores (KEY, STATUS, KEEP) and clip scores (NaN: no caption, same rows)."""
    status = scores.column(schema.STATUS).to_numpy(zero_copy_only=False)
    keep = scores.column(schema.KEEP).to_numpy(zero_copy_only=False).astype(bool)
    keys = scores.column(schema.KEY).to_numpy(zero_copy_only=False)
    removed = schema.is_removal(status)
    low = status == schema.STATUS_LOW_ALIGNMENT
    scored = ~np.isnan(clip_score) & ((status == schema.STATUS_OK) | removed)
    groups = {"kept": keep, "pruned": (status == schema.STATUS_OK) & ~keep, "low_alignment": low,
              "removed (other)": removed & ~low}
    hists = {name: np.histogram(clip_score[scored & m], SCORE_EDGES)[0] for name, m in groups.items()}
    rows = np.nonzero(scored)[0]
    order = rows[np.argsort(clip_score[rows], kind="stable")[:LOWEST]]
    lowest = [(float(clip_score[r]), shard, str(keys[r]), str(status[r]), bool(keep[r])) for r in order]
    no_caption = int((np.isnan(clip_score) & ((status == schema.STATUS_OK) | removed)).sum())
    return Alignment(hists, no_caption, lowest)
