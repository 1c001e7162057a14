"""Distributed Lloyd refinement (prune/cluster/lloyd.py through the pipeline's Ray tasks) beside faiss.

For each data size, synthetic clustered unit vectors are written as the pipeline's embeddings
files (`embeddings/NNNNN.parquet`, 10,000 float16 rows each, like a LAION shard), and:

- ours: `pipelines.stages.prototypes.refine_all`, the code `ssl-prune run` uses with
  `kmeans.refine_iters > 0`. Every iteration puts the centroids in the object store once and
  runs one Ray task (1 CPU) per shard that computes the block statistics with a faiss
  IndexFlatIP search; reduce tasks fold them and the driver updates. Two ways, side by side:
  "re-read" reads the Parquet file and decodes float16 every pass (`kmeans.refine_cache: false`);
  "cached" reads it once and keeps the float32 block in the object store (`refine_cache: true`,
  the default when it fits). Timings leave out each run's first pass (the cached run's read).
- faiss: `faiss.Kmeans(spherical=True)` in this process, on the same float16-rounded vectors held
  in memory as float32, with as many OpenMP threads as Ray has CPUs, no subsampling.

Both start from the same centroids (a faiss fit on a 10% sample, what the pipeline does) and run
the same number of iterations with no early stop. The objective is the sum over points of
(1 - cos to the nearest centroid) for the final centroids (faiss's own `obj` is the sum of the
cosines, measured before its last update; we evaluate both sets of final centroids the same way).
"faiss own init" is faiss from its own random seeding on all the data, for scale: different local
optima move the objective by a few percent on clustered data, more than the implementations differ.

    .venv/bin/python benchmarks/kmeans_scaling.py [--sizes 50000 100000 200000 400000] [--dim 128] [--k 500]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipelines.stages.prototypes import refine_all
from prune import schema
from prune.cluster import lloyd
from prune.cluster.kmeans import fit_spherical_kmeans, l2_normalize
from prune.cluster.settings import KMeansConfig
from prune.io.storage import OutputDir
from prune.plan.cpu_time import cpu_seconds as machine_and_own_cpu_seconds

SHARD_ROWS = 10_000


def clustered(n: int, d: int, true_k: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around `true_k` random directions (cos to their center ~0.6), float16-rounded
    as the pipeline stores them."""
    rng = np.random.default_rng(seed)
    centers = l2_normalize(rng.normal(size=(true_k, d)))
    x = centers[rng.integers(0, true_k, n)] + 1.3 * rng.normal(size=(n, d)).astype(np.float32) / np.sqrt(d)
    return l2_normalize(x).astype(np.float16).astype(np.float32)


def write_shards(out: OutputDir, x: np.ndarray) -> list[str]:
    out.makedirs(schema.EMBEDDINGS_DIR)
    d = x.shape[1]
    shards = []
    for i, start in enumerate(range(0, len(x), SHARD_ROWS)):
        block = x[start : start + SHARD_ROWS].astype(np.float16)
        shard = f"{i:05d}"
        table = pa.table(
            {
                schema.KEY: [f"{shard}{j:05d}" for j in range(len(block))],
                schema.SHARD: [shard] * len(block),
                schema.STATUS: [schema.STATUS_OK] * len(block),
                schema.EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(block.ravel()), d),
            },
            schema=schema.embeddings_schema(d),
        )
        with out.open_atomic(schema.EMBEDDINGS_DIR, schema.shard_file(shard)) as f:
            pq.write_table(table, f)
        shards.append(shard)
    return shards


def faiss_run(x: np.ndarray, k: int, iters: int, init: np.ndarray | None, seed: int = 0) -> tuple[np.ndarray, list[float]]:
    km = faiss.Kmeans(x.shape[1], k, niter=iters, spherical=True, seed=seed, max_points_per_centroid=len(x) + 1)
    km.train(x, init_centroids=init)
    cumulative = [s["time"] for s in km.iteration_stats]  # faiss reports time since the start
    return km.centroids, list(np.diff([0.0] + cumulative))


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and every live descendant (the local Ray:
    raylet, workers). Unlike wall time it barely moves when other jobs share the cores."""
    return machine_and_own_cpu_seconds()[1]


def prepare(n: int, d: int, k: int, root: str) -> dict:
    """Data, its shards, and the sample-fit centroids both methods start from."""
    x = clustered(n, d, true_k=k, seed=n)
    out = OutputDir(os.path.join(root, f"n{n}"))
    shards = write_shards(out, x)
    sample = x[np.random.default_rng(1).choice(n, n // 10, replace=False)]
    c0, _ = fit_spherical_kmeans(sample, k, niter=10, seed=0)
    return {"n": n, "x": x, "out": out, "shards": shards, "c0": c0, "shards_per_task": 1, "wall": [], "cpu": [], "cached_wall": [],
            "cached_cpu": [], "faiss_wall": [], "faiss_cpu": []}


def run_ours(case: dict, iters: int, cache: bool) -> tuple[np.ndarray, dict]:
    """The pipeline's refinement; per-iteration wall and CPU seconds (but the first's) appended."""
    kc = KMeansConfig(refine_iters=iters, refine_tol=0.0, refine_shards_per_task=case["shards_per_task"],
                      refine_cache=cache)
    last = [cpu_seconds()]
    prefix = "cached_" if cache else ""
    seen = [0]

    def tick(entry: dict) -> None:
        now = cpu_seconds()
        seen[0] += 1
        if seen[0] > 1:  # the first pass also reads (cached: the only read)
            case[prefix + "wall"].append(entry["seconds"])
            case[prefix + "cpu"].append(now - last[0])
        last[0] = now

    centroids, meta = refine_all(kc, case["out"], case["shards"], case["c0"], {}, on_iteration=tick,
                                 n_rows=case["n"])
    return centroids, meta["refine"]


def run_faiss(case: dict, iters: int, init: np.ndarray | None) -> np.ndarray:
    """faiss.Kmeans on the in-memory data; the mean per-iteration wall and CPU seconds appended."""
    c0 = cpu_seconds()
    centroids, wall = faiss_run(case["x"], case["c0"].shape[0], iters, init)
    cpu = (cpu_seconds() - c0) / iters  # faiss gives no per-iteration CPU: the mean (init included)
    case["faiss_wall"] += wall
    case["faiss_cpu"] += [cpu] * iters
    return centroids


def objectives(case: dict, iters: int, own_init: bool) -> dict:
    x = case["x"]
    ours, meta = run_ours(case, iters, cache=False)
    cached, _ = run_ours(case, iters, cache=True)
    assert np.array_equal(ours, cached), "the cache must not change the centroids"
    theirs = run_faiss(case, iters, case["c0"])
    row = {
        "obj_init": lloyd.objective_of([x], case["c0"]),
        "obj_ours": lloyd.objective_of([x], ours), "obj_faiss": lloyd.objective_of([x], theirs),
        "reseeded": meta["reseeded_total"],
    }
    if own_init:
        row["obj_faiss_own"] = lloyd.objective_of([x], faiss_run(x, case["c0"].shape[0], iters, None)[0])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50_000, 100_000, 200_000, 400_000])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=500)
    ap.add_argument("--iters", type=int, default=6, help="iterations of the objective runs")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds over all sizes, 3 iterations each")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--shards-per-task", type=int, default=1, help="kmeans.refine_shards_per_task")
    ap.add_argument("--save", default=None, help="also write the table to this file")
    args = ap.parse_args()

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    faiss.omp_set_num_threads(args.num_cpus)
    load_before = os.getloadavg()[0]
    root = tempfile.mkdtemp(prefix="kmeans_scaling_")
    try:
        cases = [prepare(n, args.dim, args.k, root) | {"shards_per_task": args.shards_per_task} for n in args.sizes]
        rows = [objectives(c, args.iters, own_init=c is cases[-1]) for c in cases]
        for _ in range(args.rounds):  # sizes interleaved: a busy spell on the machine hits them all
            for c in cases:
                run_ours(c, 3, cache=False)
                run_ours(c, 3, cache=True)
                run_faiss(c, 2, c["c0"])
        for c, row in zip(cases, rows):
            row |= {"n": c["n"], "shards": len(c["shards"]), "samples": len(c["wall"])}
            for key in ("wall", "cpu", "cached_wall", "cached_cpu", "faiss_wall", "faiss_cpu"):
                row[key] = float(np.median(c[key]))
                row[key + "_min"] = float(np.min(c[key]))
    finally:
        shutil.rmtree(root, ignore_errors=True)
        ray.shutdown()
    text = report(rows, args, load_before, os.getloadavg()[0])
    print(text)
    if args.save:
        with open(args.save, "w") as f:
            f.write(text + "\n")


def report(rows: list[dict], args, load_before: float, load_after: float) -> str:
    base = rows[0]

    def rel(r: dict, key: str) -> str:  # time per point relative to the smallest size: 1.00 = linear
        return f"{(r[key] / r['n']) / (base[key] / base['n']):.2f}"

    lines = [
        f"spherical k-means, d={args.dim}, k={args.k}, from the same sample-fit centroids, {args.num_cpus} CPUs. "
        f"Ours: the pipeline's refinement, Ray tasks (1 CPU each, {args.shards_per_task} shard(s) per task) over "
        f"{SHARD_ROWS:,}-row Parquet shards on "
        f"local disk, re-read every pass or cached in the object store; faiss: faiss.Kmeans, {args.num_cpus} "
        f"OpenMP threads, data in memory. faiss {faiss.__version__}, ray {ray.__version__}. Load average "
        f"{load_before:.1f} before, {load_after:.1f} after (the machine is shared).",
        "",
        f"(a, b) seconds per iteration, median of {rows[0]['samples']} iterations (the first pass of every run "
        "left out; sizes interleaved); CPU s = CPU time of the driver and every Ray process; 'faiss rate' = "
        "faiss CPU s / ours CPU s (1.00: as fast per point as faiss); 'per n' = CPU seconds per point relative "
        "to the smallest size (1.00 = linear)",
        "",
        "| n | shards | re-read wall s | cached wall s | faiss wall s | re-read CPU s | cached CPU s | faiss CPU s "
        "| faiss rate, re-read | faiss rate, cached | cached CPU per n | faiss CPU per n |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['shards']} | {r['wall']:.3f} | {r['cached_wall']:.3f} | {r['faiss_wall']:.3f} | "
            f"{r['cpu']:.2f} | {r['cached_cpu']:.2f} | {r['faiss_cpu']:.2f} | {r['faiss_cpu'] / r['cpu']:.2f} | "
            f"{r['faiss_cpu'] / r['cached_cpu']:.2f} | {rel(r, 'cached_cpu')} | {rel(r, 'faiss_cpu')} |"
        )
    lines += [
        "",
        f"(c) final objective after {args.iters} iterations: sum of (1 - cos) to the nearest centroid (lower is better)",
        "",
        "| n | sample-fit init | ours | faiss, same init | ours vs faiss | faiss, own init | re-seeds |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        own = f"{r['obj_faiss_own']:.1f}" if "obj_faiss_own" in r else "-"
        lines.append(
            f"| {r['n']:,} | {r['obj_init']:.1f} | {r['obj_ours']:.1f} | {r['obj_faiss']:.1f} | "
            f"{100 * (r['obj_ours'] / r['obj_faiss'] - 1):+.3f}% | {own} | {r['reseeded']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
