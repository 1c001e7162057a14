"""Which pool statistic tells a clean pool from a web-like one: the screen behind `select.policy: auto`.

For each run output given (a run with at least [embed, prototypes, assign, dedup]), prints the
statistics screened, from what the stages wrote (assign/ and removals/dedup/): the share dedup
removed, how unevenly it removed across clusters (coefficient of variation of the per-cluster
removal rates), how skewed the surviving clusters are (Gini of their sizes), and the tail of the
prototype distances (p90 / p50 and p99 / p50; the last is the one `auto` uses), then the rule
`auto` picks at the threshold given.

    # the pools of the table in docs/concepts.md, "One default" (benchmarks/results/auto_rule.txt), each run up to dedup
    ssl-prune demo-data /tmp/pools/clean4k --count 4000 --shard-size 1000 --seed 1
    ssl-prune demo-data /tmp/pools/clean20k --count 20000 --shard-size 2000 --seed 2
    ssl-prune demo-data /tmp/pools/clean60k --count 60000 --shard-size 5000
    ssl-prune demo-data /tmp/pools/web4k --web-like --count 4000 --shard-size 1000 --seed 1
    ssl-prune demo-data /tmp/pools/web20k --web-like --count 20000 --shard-size 2000
    ssl-prune demo-data /tmp/pools/webmild --web-like --count 10000 --shard-size 2000 --seed 2 \
        --imbalance 5 --copy-share 0.1 --junk-share 0.01
    ssl-prune demo-data /tmp/pools/webcopies --web-like --count 10000 --shard-size 2000 --seed 3 \
        --imbalance 1 --copy-share 0.3 --junk-share 0
    ssl-prune demo-data /tmp/pools/webtail --web-like --count 10000 --shard-size 2000 --seed 4 \
        --imbalance 20 --copy-share 0 --junk-share 0
    for p in clean4k clean20k clean60k web4k web20k webmild webcopies webtail; do
      ssl-prune run configs/demo.yaml input=/tmp/pools/$p output=/tmp/auto/$p 'stages=[embed,prototypes,assign,dedup]'
    done
    .venv/bin/python benchmarks/auto_rule.py /tmp/auto/*
"""

from __future__ import annotations

import argparse
import glob
import os

import numpy as np
import pyarrow.parquet as pq

from prune import schema
from prune.select import auto


def gini(x: np.ndarray) -> float:
    x = np.sort(np.asarray(x, np.float64))
    n = len(x)
    return float((2 * np.arange(1, n + 1) - n - 1).dot(x) / (n * x.sum())) if n and x.sum() else float("nan")


def _read(run: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cluster, distance, removed by dedup) of every ok assigned sample, shard by shard."""
    clusters, dists, removed = [], [], []
    for path in sorted(glob.glob(os.path.join(run, schema.ASSIGN_DIR, "*.parquet"))):
        a = pq.read_table(path)
        ok = a.column(schema.STATUS).to_numpy(zero_copy_only=False) == schema.STATUS_OK
        gone = os.path.join(run, schema.REMOVALS_DIR, "dedup", os.path.basename(path))
        gone_keys = set(pq.read_table(gone, columns=[schema.KEY]).column(0).to_pylist()) if os.path.exists(gone) else set()
        clusters.append(a.column(schema.CLUSTER).to_numpy()[ok])
        dists.append(a.column(schema.DISTANCE).to_numpy(zero_copy_only=False)[ok].astype(np.float64))
        removed.append(np.array([k in gone_keys for k in a.column(schema.KEY).to_numpy(zero_copy_only=False)[ok]], bool))
    return np.concatenate(clusters), np.concatenate(dists), np.concatenate(removed)


def pool_stats(run: str, threshold: float) -> dict:
    cluster, dist, removed = _read(run)
    k = int(cluster.max()) + 1
    size = np.bincount(cluster, minlength=k)
    rate = np.bincount(cluster[removed], minlength=k) / np.maximum(size, 1)
    p50, p90 = np.percentile(dist, [50, 90])
    choice = auto.choose(auto.distance_histogram(dist), threshold)
    return {"run": os.path.basename(run.rstrip("/")), "n": len(dist), "k": k, "removed": removed.mean(),
            "rate_cv": rate.std() / rate.mean() if rate.mean() else float("nan"),
            "surv_gini": gini(size - np.bincount(cluster[removed], minlength=k)), "p90/p50": p90 / p50,
            "p99/p50": choice.tail_ratio, "rule": choice.rule}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run output directories (assign/ and removals/dedup/)")
    ap.add_argument("--threshold", type=float, default=3.1, help="select.auto_tail_ratio")
    args = ap.parse_args()
    cols = ("run", "n", "k", "removed", "rate_cv", "surv_gini", "p90/p50", "p99/p50", "rule")
    print("| " + " | ".join(cols) + " |\n|" + " --- |" * len(cols))
    for run in args.runs:
        s = pool_stats(run, args.threshold)
        print("| " + " | ".join(f"{s[c]:.2f}" if isinstance(s[c], float) else str(s[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
