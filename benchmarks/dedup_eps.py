"""SemDeDup's threshold on a web-like pool: what each `dedup.eps` removes, by the kind of sample.

The pool built by `ssl-prune demo-data DIR --web-like` says what every sample is (`kind`:
original / copy / junk; `copy_of`: the original a copy was made from). The dedup stage never sees
that; this script does, to show the curve a user has to pick `eps` on: the share of near-copies
removed (wanted) against the share of unique originals removed (diversity lost).

It runs the library code the stages run, on the pool in memory: `prune.evaluate.subsets.prototypes`
(the prototypes stage's fit) and `near_duplicates` (the dedup stage's per-cluster rule).

    ssl-prune demo-data demo/web/train --web-like --count 20000 --shard-size 2000
    ssl-prune evaluate configs/evaluate_web.yaml          # embeds the pool: demo/eval-web/train/embeddings
    .venv/bin/python benchmarks/dedup_eps.py --pool demo/web/train --embeddings demo/eval-web/train/embeddings
    # a clean pool (no kinds: every sample an original), e.g. the 60k of configs/evaluate_fmnist.yaml:
    .venv/bin/python benchmarks/dedup_eps.py --pool demo/fmnist/train --embeddings demo/eval/train/embeddings --k 10
"""

from __future__ import annotations

import argparse
import glob
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prune import schema
from prune.cluster.settings import KMeansConfig
from prune.dedup.settings import DedupConfig
from prune.evaluate.layout import KIND_COPY, KIND_JUNK, KIND_ORIGINAL
from prune.evaluate.subsets import near_duplicates, prototypes


def load(pool_dir: str, embeddings_dir: str):
    """Embeddings (float32), shard names, keys, kinds and copy_of of every ok sample of the pool."""
    vectors, shards, keys, kinds, copy_of = [], [], [], [], []
    for path in sorted(glob.glob(os.path.join(embeddings_dir, "*.parquet"))):
        shard = os.path.basename(path).removesuffix(".parquet")
        table = pq.read_table(path)
        table = table.filter(np.asarray(table.column(schema.STATUS).to_numpy(zero_copy_only=False)) == schema.STATUS_OK)
        meta = pq.read_table(os.path.join(pool_dir, f"{shard}.parquet"))
        if "kind" not in meta.column_names:  # a clean pool (demo-data without --web-like): all originals
            meta = meta.append_column("kind", pa.array([KIND_ORIGINAL] * len(meta))).append_column(
                "copy_of", pa.array([None] * len(meta), pa.string()))
        by_key = {k: (kd, c) for k, kd, c in zip(*(meta.column(n).to_pylist() for n in (schema.KEY, "kind", "copy_of")))}
        ks = table.column(schema.KEY).to_pylist()
        flat = table.column(schema.EMBEDDING).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        vectors.append(flat.reshape(len(ks), -1).astype(np.float32))
        shards += [shard] * len(ks)
        keys += ks
        kinds += [by_key[k][0] for k in ks]
        copy_of += [by_key[k][1] for k in ks]
    return np.concatenate(vectors), np.array(shards, object), np.array(keys, object), np.array(kinds), copy_of


def _share(flags: np.ndarray, among: np.ndarray, total: int | None = None) -> str:
    """The share of `among` that `flags` marks (of `total` when given), or "-" when there is none."""
    n = total if total is not None else int(among.sum())
    return f"{int((flags & among).sum()) / n:.1%}" if n else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", default="demo/web/train")
    ap.add_argument("--embeddings", default="demo/eval-web/train/embeddings")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--eps", type=float, nargs="+", default=[0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05])
    args = ap.parse_args()

    emb, shards, keys, kinds, copy_of = load(args.pool, args.embeddings)
    roots = {c for c in copy_of if c}
    family = np.array([c if c else (k if k in roots else "") for k, c in zip(keys, copy_of)], object)
    unique = (kinds == KIND_ORIGINAL) & (family == "")
    n_families = len(roots)
    cluster, distance, _, _ = prototypes(emb, KMeansConfig(k=args.k, sample_size=10**9, niter=25, seed=0), shards)
    print(f"pool {len(keys)}: {int((kinds == KIND_ORIGINAL).sum())} originals ({int(unique.sum())} with no copy), "
          f"{int((kinds == KIND_COPY).sum())} copies of {n_families} popular originals, "
          f"{int((kinds == KIND_JUNK).sum())} junk; k = {args.k}\n")
    print("| eps | removed | copy-family members removed | unique originals removed | junk removed "
          "| families left with one member |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    in_family = family != ""
    for eps in args.eps:
        removed = near_duplicates(emb, distance, cluster, shards, keys, DedupConfig(eps=eps))
        left = family[in_family & ~removed]
        _, per_family = np.unique(left, return_counts=True)
        print(f"| {eps:g} | {removed.mean():.1%} | {_share(removed, in_family)} | {_share(removed, unique)} "
              f"| {_share(removed, kinds == KIND_JUNK)} | {_share(per_family == 1, per_family >= 0, n_families)} |")


if __name__ == "__main__":
    main()
