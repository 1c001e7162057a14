"""What holds the best policy back on the web-like pool: one part at a time swapped for the oracle's.

`evaluate` says dedup+dbp-hard beats random on the web-like pool by less than the label oracle does.
The pool has three things a policy must handle: near-copies, junk and long-tailed classes. This
script trains the same CNN on subsets that differ from dedup+dbp-hard in one part, replaced by what
the labels and kinds (which no policy may see) would do:

- junk removed by the oracle, then dedup+dbp-hard (is junk what is left?);
- every copy removed by the oracle instead of dedup, then dbp-hard (is dedup's recall the limit?);
- dedup, then budgets over the classes instead of the clusters (capped-equal over the labels; the
  junk dedup left is a group of its own), in the hard order and in random order (is the grouping the
  limit, or the order?);
- the policy's other orders under the same budgets: dedup+dbp-random, dedup+dbp-stratified,
  dedup+capped-random.

Everything else is `evaluate`'s own code path: the pool's prototypes, the dedup rule, the select
stage's budgets and cuts (`prune.evaluate.subsets`), the CNN with the same steps (`train_cnn`), the
same seeds, paired against random by seed.

    ssl-prune evaluate configs/evaluate_web.yaml       # embeds the pool and the test split first
    .venv/bin/python benchmarks/web_ablation.py [--config configs/evaluate_web.yaml] [--seeds 0 1 2 3 4]
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from pipelines.cli.config import EvaluateConfig, load_config
from pipelines.inputs import resolve_shards
from pipelines.stages.evaluate import LabelTask, load_shard
from prune.embed.decode import PreprocessSpec
from prune.evaluate import classifiers, labels, subsets
from prune.evaluate.layout import KIND_COPY, KIND_JUNK
from prune.io.storage import OutputDir

FRACTIONS = [0.3, 0.5]
_DATA: dict = {}  # the pool and test sets, set before the worker processes fork


def load_split(cfg: EvaluateConfig, split_dir: str, input_spec: str) -> labels.LabeledSet:
    """One split as `evaluate` loads it: its embeddings joined with labels, kinds and pixels."""
    out = OutputDir(os.path.join(cfg.output, split_dir))
    spec = PreprocessSpec(size=cfg.evaluate.cnn.image_size)
    parts = [load_shard(LabelTask(out, shard, url, cfg.evaluate.label_field, tuple(cfg.image_extensions), spec,
                                  cfg.decode.draft, cfg.decode.max_image_pixels))
             for shard, url in sorted(resolve_shards(input_spec).items())]
    return labels.LabeledSet.concat(parts, parts[0].embeddings.shape[1], spec.size)


def fit(pool: labels.LabeledSet, cfg: EvaluateConfig) -> tuple:
    """The pool's prototypes and what dedup removes, as `evaluate` computes them (seed-free)."""
    cluster, distance, meta, centroids = subsets.prototypes(pool.embeddings, cfg.kmeans, pool.shards)
    removed = subsets.near_duplicates(pool.embeddings, distance, cluster, pool.shards, pool.keys, cfg.evaluate.dedup)
    return cluster, distance, centroids, removed, int(meta["k"])


def variants(pool: labels.LabeledSet, cfg: EvaluateConfig, fitted: tuple, seed: int) -> dict[str, np.ndarray]:
    """Every variant's bands (`subsets.select_bands`' convention) for one seed."""
    cluster, distance, centroids, removed, k = fitted
    options = cfg.evaluate.select_options()  # strata, drop_hardest, dbp settings: as evaluate passes them
    junk, copies = pool.kinds == KIND_JUNK, pool.kinds == KIND_COPY
    classes = np.where(pool.labels < 0, pool.labels.max() + 1, pool.labels)  # junk: a group of its own
    n_classes = int(classes.max()) + 1
    common = (pool.shards, pool.keys, seed)

    def after(policy, gone, groups=cluster, n_groups=k):
        return subsets.bands_after_dedup(policy, FRACTIONS, gone, distance, groups, n_groups, *common, centroids,
                                         **options)

    return {
        "random": subsets.select_bands("random", FRACTIONS, distance, cluster, k, *common, **options),
        "dedup+dbp-hard (evaluate's best)": after("dbp-hard", removed),
        "junk removed by the oracle, dedup+dbp-hard": after("dbp-hard", removed | junk),
        "copies removed by the oracle (no dedup), dbp-hard": after("dbp-hard", copies),
        "dedup, capped over the classes, hard": after("capped-hard", removed, classes, n_classes),
        "dedup, capped over the classes, random": after("capped-random", removed, classes, n_classes),
        "dedup+dbp-random": after("dbp-random", removed),
        "dedup+dbp-stratified": after("dbp-stratified", removed),
        "dedup+capped-random": after("capped-random", removed),
    }


def train(job: tuple) -> tuple[float, float]:
    idx, seed, cnn = job
    import torch

    torch.set_num_threads(1)
    pool, test, pool_y, test_y, n_classes = (_DATA[k] for k in ("pool", "test", "pool_y", "test_y", "n_classes"))
    result = classifiers.train_cnn(pool.pixels[idx], pool_y[idx], test.pixels, test_y, n_classes, cnn, seed)
    return result["balanced_accuracy"], result["worst3_accuracy"]


def train_paired(jobs: list, tags: list, workers: int) -> dict:
    """Trains every job (`train`'s argument), `workers` at once; tags are (name, fraction, seed, *extra)
    with a "random" name among them -> name -> fraction -> [(balanced, worst-3 accuracy minus random's
    for the same fraction and seed, in points), *extra] per seed."""
    with ProcessPoolExecutor(workers) as ex:
        results = list(ex.map(train, jobs))
    base = {(f, s): r for (name, f, s, *_), r in zip(tags, results) if name == "random"}
    rows: dict = {}
    for (name, f, s, *extra), (bal, worst) in zip(tags, results):
        rows.setdefault(name, {}).setdefault(f, []).append(
            (100 * (bal - base[(f, s)][0]), 100 * (worst - base[(f, s)][1]), *extra))
    return rows


def paired_cells(by_fraction: dict) -> tuple[list[str], str, dict]:
    """One row's cells: 'mean ± std' of the balanced difference per fraction, the worst-3 means
    'a / b', and the per-fraction arrays (columns: balanced, worst-3, extras)."""
    a = {f: np.array(v) for f, v in by_fraction.items()}
    cells = [f"{a[f][:, 0].mean():+.1f} ± {a[f][:, 0].std(ddof=1) if len(a[f]) > 1 else 0:.1f}" for f in FRACTIONS]
    return cells, " / ".join(f"{a[f][:, 1].mean():+.1f}" for f in FRACTIONS), a


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/evaluate_web.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--workers", type=int, default=2, help="trainings at once, one core each")
    args = ap.parse_args()
    cfg = load_config(args.config, [], EvaluateConfig)
    if cfg.evaluate.pool_size is not None:
        raise SystemExit("web_ablation.py uses the whole pool: set evaluate.pool_size to null in the config")
    for split in ("train", "test"):
        if not os.path.isdir(os.path.join(cfg.output, split, "embeddings")):
            raise SystemExit(f"no embeddings in {cfg.output}/{split}/embeddings: run `ssl-prune evaluate {args.config}` first")
    t0 = time.perf_counter()
    pool = load_split(cfg, "train", cfg.train_input)
    test = load_split(cfg, "test", cfg.test_input)
    classes, (pool_y, test_y) = labels.class_indices(pool.labels, test.labels)
    _DATA.update(pool=pool, test=test, pool_y=pool_y, test_y=test_y, n_classes=len(classes))
    fitted = fit(pool, cfg)
    jobs, tags = [], []
    for seed in args.seeds:
        for name, bands in variants(pool, cfg, fitted, seed).items():
            for i, fraction in enumerate(FRACTIONS):
                idx = subsets.kept_indices(bands, i)
                jobs.append((idx, seed, cfg.evaluate.cnn))
                tags.append((name, fraction, seed, float(np.mean(pool.kinds[idx] == KIND_COPY)),
                             float(np.mean(pool.kinds[idx] == KIND_JUNK))))
    rows = train_paired(jobs, tags, args.workers)
    print(f"{args.config}: {len(pool)} pool samples, {len(test)} test; k = {cfg.kmeans.k}; dedup eps "
          f"{cfg.evaluate.dedup.eps} keeping {cfg.evaluate.dedup.keep}; CNN {cfg.evaluate.cnn.steps} steps; "
          f"seeds {args.seeds}; {time.perf_counter() - t0:.0f} s")
    print()
    print("Balanced accuracy and worst-3-classes accuracy minus random's (points, paired by seed, mean ± std), "
          "and the share of the kept subset that is near-copies and junk:")
    print()
    print("| variant | 0.3 | 0.5 | worst-3, 0.3 / 0.5 | copies in subset, 0.3 / 0.5 | junk in subset, 0.3 / 0.5 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, by_f in rows.items():
        cells, worst, a = paired_cells(by_f)
        copies = " / ".join(f"{a[f][:, 2].mean():.1%}" for f in FRACTIONS)
        junk = " / ".join(f"{a[f][:, 3].mean():.1%}" for f in FRACTIONS)
        print(f"| {name} | {cells[0]} | {cells[1]} | {worst} | {copies} | {junk} |")


if __name__ == "__main__":
    main()
