"""Can a label-free grouping balance the web-like pool's classes better than the prototypes do?

`web_ablation.py` found that budgets over the true classes, in random order, match the label
oracle (+3.8 / +2.3 over random), while the same budgets over our k-means clusters give +1.1 and
dedup+dbp-hard gives +1.8 / +1.7. So the question is the grouping. This screen needs no training:
it measures how far each label-free subset's class make-up is from the class-capped one (total
variation distance of the per-class counts, 0 = the same classes in the same amounts), which
orders the ablation's trained results (class-capped 0 -> +3.8; dbp-hard; capped-random; random).

Candidates, every one after the same SemDeDup (the pool's prototypes, `evaluate`'s rule):
- the prototypes (k-means, `evaluate`'s k) with capped-random and dbp-hard: `evaluate`'s code path;
- communities of the survivors' k-NN graph (Louvain, networkx), at two resolutions, with
  capped budgets in random order and dbp budgets in the hard order (distance to the community mean);
- density-weighted sampling: each survivor weighted by its k-NN radius to the power alpha
  (sparse regions, where rare classes live, weigh more), drawn without replacement
  (Efraimidis-Spirakis), over the whole pool and inside the dbp budgets.

    ssl-prune evaluate configs/evaluate_web.yaml       # embeds the pool first
    .venv/bin/python benchmarks/grouping_screen.py [--config configs/evaluate_web.yaml] [--train 0 1 2 3 4]

`--train` also trains `web_ablation.py`'s CNN on every candidate, paired against random by seed.
"""

from __future__ import annotations

import argparse
import os
import time

import faiss
import numpy as np
from web_ablation import FRACTIONS, fit, load_split

from pipelines.cli.config import EvaluateConfig, load_config
from prune.evaluate import subsets
from prune.evaluate.layout import KIND_COPY, KIND_JUNK
from prune.select.budgets import BUDGETS, ClusterStats, dense_sums, distance_sums

NEIGHBOURS = 20  # k of the k-NN graph and of the density radius


def unit(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities and ids of each row's k nearest other rows (exact faiss search)."""
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, ids = index.search(x, k + 1)
    return sims[:, 1:], ids[:, 1:]


def louvain(ids: np.ndarray, sims: np.ndarray, resolution: float) -> np.ndarray:
    """Community of each row in the k-NN graph (an edge where either end lists the other, weighted
    by their cosine), by Louvain modularity: groups of any size, where k-means splits dense regions."""
    import networkx as nx  # comes with torch

    n, k = ids.shape
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    graph.add_weighted_edges_from(zip(np.repeat(np.arange(n), k).tolist(), ids.ravel().tolist(),
                                      sims.ravel().astype(float).tolist()))
    groups = np.empty(n, np.int64)
    for g, members in enumerate(sorted(nx.community.louvain_communities(graph, resolution=resolution, seed=0),
                                       key=len, reverse=True)):
        groups[list(members)] = g
    return groups


def group_distance(x: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(1 - cos to the group's mean direction, the unit means): a community's prototype distance."""
    means = np.zeros((groups.max() + 1, x.shape[1]), np.float32)
    np.add.at(means, groups, x)
    means = unit(means)
    return 1.0 - np.einsum("ij,ij->i", x, means[groups]), means


def per_group(groups: np.ndarray, n_keep: np.ndarray, prio: np.ndarray) -> list[np.ndarray]:
    """Row indices kept at each fraction: each group's n_keep[g, e] highest priorities."""
    order = np.lexsort((-prio, groups))  # by group, then priority descending
    start = np.searchsorted(groups[order], np.arange(n_keep.shape[0]))
    return [np.concatenate([order[s : s + n] for s, n in zip(start, n_keep[:, e])]) for e in range(n_keep.shape[1])]


def budgets(name: str, groups: np.ndarray, distance: np.ndarray, centroids: np.ndarray, fractions) -> np.ndarray:
    """Each group's keep counts under the budget `name`; group g's centroid is centroids[g] (a group
    dedup emptied keeps its row, with size 0)."""
    n_groups = len(centroids)
    sizes = np.bincount(groups, minlength=n_groups)
    sums = dense_sums(distance_sums(groups, distance), n_groups)
    return BUDGETS.get(name)().allocate(sizes, fractions, ClusterStats(sizes, sums, centroids), 0)


class Screen:
    """The pool, its prototypes and dedup, and the seed-free groupings; `subsets(seed)` builds every
    candidate's kept rows at each fraction (row order: the reference first)."""

    def __init__(self, cfg: EvaluateConfig, pool):
        self.cfg, self.pool = cfg, pool
        self.cluster, self.distance, self.centroids, self.removed, self.k = fit(pool, cfg)
        self.classes = np.where(pool.labels < 0, pool.labels.max() + 1, pool.labels)  # junk: a class of its own
        self.n_classes = int(self.classes.max()) + 1
        self.survivors = np.nonzero(~self.removed)[0]
        self.x = unit(pool.embeddings[self.survivors])
        self.fractions = [min(1.0, f * len(pool) / len(self.survivors)) for f in FRACTIONS]  # as bands_after_dedup
        sims, ids = knn(self.x, NEIGHBOURS)
        self.radius = 1.0 - sims[:, -1]
        own = self.classes[self.survivors]
        self.neighbour_agreement = float(np.mean(own[ids[:, :10]] == own[:, None]))  # of the 10 nearest
        self.communities = {r: louvain(ids, sims, r) for r in (0.3, 1.0)}

    def groups_of(self, name: str) -> np.ndarray | None:
        """Each pool sample's group under a candidate's grouping (-1: removed by dedup), if it has one."""
        if name.startswith("prototypes"):
            return self.cluster
        if name.startswith("dedup, capped over the classes"):
            return self.classes
        for r, g in self.communities.items():
            if f"resolution {r} " in name:
                full = np.full(len(self.pool), -1, np.int64)
                full[self.survivors] = g
                return full
        return None

    def subsets(self, seed: int) -> dict[str, list[np.ndarray]]:
        pool, cluster, distance, k, surv = self.pool, self.cluster, self.distance, self.k, self.survivors
        common = (pool.shards, pool.keys, seed)
        options = self.cfg.evaluate.select_options()

        def standard(policy, groups=cluster, n_groups=k):  # evaluate's own select path
            bands = subsets.bands_after_dedup(policy, FRACTIONS, self.removed, distance, groups, n_groups, *common,
                                              self.centroids, **options)
            return [subsets.kept_indices(bands, i) for i in range(len(FRACTIONS))]

        def pick(groups, n_keep, prio):
            return [surv[i] for i in per_group(groups, n_keep, prio)]

        u = np.random.default_rng(seed).random(len(surv))
        everyone = np.zeros(len(surv), np.int64)
        global_keep = budgets("proportional", everyone, distance[surv], self.centroids[:1], self.fractions)
        dbp_keep = budgets("dbp", cluster[surv], distance[surv], self.centroids, self.fractions)
        no_dedup = subsets.select_bands("random", FRACTIONS, distance, cluster, k, *common, **options)
        rows = {
            "dedup, capped over the classes, random (reference)": standard("capped-random", self.classes,
                                                                           self.n_classes),
            "random": [subsets.kept_indices(no_dedup, i) for i in range(len(FRACTIONS))],
            "dedup+random": standard("random"),
            f"prototypes (k = {k}): dedup+capped-random": standard("capped-random"),
            f"prototypes (k = {k}): dedup+dbp-hard (evaluate's best)": standard("dbp-hard"),
        }
        for r, g in self.communities.items():
            gd, means = group_distance(self.x, g)
            name = f"{NEIGHBOURS}-NN graph, Louvain resolution {r} ({g.max() + 1} communities)"
            rows[f"{name}: capped-random"] = pick(g, budgets("capped_equal", g, gd, means, self.fractions), u)
            rows[f"{name}: dbp-hard"] = pick(g, budgets("dbp", g, gd, means, self.fractions), gd)
        for alpha in (2, 8):
            prio = np.log(u) / (self.radius / np.median(self.radius)) ** alpha  # u ** (1 / w): weighted draws
            rows[f"density-weighted (radius^{alpha}), whole pool"] = pick(everyone, global_keep, prio)
            rows[f"density-weighted (radius^{alpha}), inside the dbp budgets"] = pick(cluster[surv], dbp_keep, prio)
        return rows


def composition_table(screen: Screen, rows: dict[str, list[np.ndarray]]) -> None:
    pool, classes, n_classes = screen.pool, screen.classes, screen.n_classes
    reference = [np.bincount(classes[i], minlength=n_classes) for i in next(iter(rows.values()))]
    originals = (pool.kinds != KIND_COPY) & (classes != n_classes - 1)
    rare = np.argsort(np.bincount(classes[originals], minlength=n_classes)[: n_classes - 1])[:3]
    print("Distance of each subset's class make-up from the class-capped subset's (total variation, 0 = the same), "
          "the rarest 3 classes' originals kept, junk and copies in the subset, and how pure the grouping is "
          "(share of survivors in their group's majority class):")
    print()
    print("| grouping and policy | class distance, 0.3 / 0.5 | rarest-3 originals kept, 0.3 / 0.5 | junk, 0.3 / 0.5 "
          "| copies, 0.3 / 0.5 | purity |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, kept in rows.items():
        counts = [np.bincount(classes[i], minlength=n_classes) for i in kept]
        tv = " / ".join(f"{0.5 * np.abs(c - r).sum() / r.sum():.3f}" for c, r in zip(counts, reference))
        rare_kept = " / ".join(str(int(np.isin(classes[i], rare)[originals[i]].sum())) for i in kept)
        junk = " / ".join(f"{np.mean(pool.kinds[i] == KIND_JUNK):.1%}" for i in kept)
        copies = " / ".join(f"{np.mean(pool.kinds[i] == KIND_COPY):.1%}" for i in kept)
        groups = screen.groups_of(name)
        surv = screen.survivors
        purity = "" if groups is None else f"{purity_of(groups[surv], classes[surv]):.2f}"
        print(f"| {name} | {tv} | {rare_kept} | {junk} | {copies} | {purity} |")


def accuracy_table(screen: Screen, cfg: EvaluateConfig, seeds: list[int], workers: int) -> None:
    """The CNN on every candidate's subsets, as web_ablation.py trains them, paired against random."""
    import web_ablation

    from prune.evaluate import labels

    test = load_split(cfg, "test", cfg.test_input)
    classes, (pool_y, test_y) = labels.class_indices(screen.pool.labels, test.labels)
    web_ablation._DATA.update(pool=screen.pool, test=test, pool_y=pool_y, test_y=test_y, n_classes=len(classes))
    jobs, tags = [], []
    for seed in seeds:
        for name, kept in screen.subsets(seed).items():
            for f, idx in zip(FRACTIONS, kept):
                jobs.append((np.sort(idx), seed, cfg.evaluate.cnn))
                tags.append((name, f, seed))
    rows = web_ablation.train_paired(jobs, tags, workers)
    print(f"The CNN ({cfg.evaluate.cnn.steps} steps) on each subset: balanced and worst-3-classes accuracy minus "
          f"random's (points, paired by seed, mean ± std over seeds {seeds}):")
    print()
    print("| grouping and policy | 0.3 | 0.5 | worst-3, 0.3 / 0.5 |")
    print("| --- | ---: | ---: | ---: |")
    for name, by_f in rows.items():
        cells, worst, _ = web_ablation.paired_cells(by_f)
        print(f"| {name} | {cells[0]} | {cells[1]} | {worst} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/evaluate_web.yaml")
    ap.add_argument("--seed", type=int, default=0, help="the seed of the composition table")
    ap.add_argument("--train", type=int, nargs="*", metavar="SEED",
                    help="also train the CNN on every candidate with these seeds (e.g. 0 1 2 3 4; about 1 min per "
                         "candidate and seed on 2 cores)")
    ap.add_argument("--workers", type=int, default=2, help="trainings at once, one core each")
    args = ap.parse_args()
    cfg = load_config(args.config, [], EvaluateConfig)
    if cfg.evaluate.pool_size is not None:
        raise SystemExit("grouping_screen.py uses the whole pool: set evaluate.pool_size to null in the config")
    if not os.path.isdir(os.path.join(cfg.output, "train", "embeddings")):
        raise SystemExit(f"no embeddings in {cfg.output}/train/embeddings: run `ssl-prune evaluate {args.config}` first")
    t0 = time.perf_counter()
    screen = Screen(cfg, load_split(cfg, "train", cfg.train_input))
    print(f"{args.config}: {len(screen.pool)} pool samples, {len(screen.survivors)} after dedup (eps "
          f"{cfg.evaluate.dedup.eps}, keeping {cfg.evaluate.dedup.keep}); k = {screen.k}; seed {args.seed}; "
          f"{screen.neighbour_agreement:.1%} of a survivor's 10 nearest survivors share its class")
    print()
    composition_table(screen, screen.subsets(args.seed))
    if args.train:
        print()
        accuracy_table(screen, cfg, args.train, args.workers)
    print()
    print(f"{time.perf_counter() - t0:.0f} s")


def purity_of(groups: np.ndarray, classes: np.ndarray) -> float:
    """Share of samples in their group's majority class."""
    table = np.zeros((groups.max() + 1, classes.max() + 1), np.int64)
    np.add.at(table, (groups, classes), 1)
    return float(table.max(axis=1).sum() / len(groups))


if __name__ == "__main__":
    main()
