"""Does the driver stay flat as the data grows? Driver peak memory and time per sample at 1M and 10M.

Synthetic clustered embeddings (d=256 float16, Parquet files of `--rows-per-file` rows with a key and
an embedding column, as NeMo Curator or our own `embeddings/` hold them) go through the run the
pipeline makes of them: `stages=[import, prototypes, assign, select]` (scores, no tars), first with
balanced selection, then global (the second run reuses import, prototypes and assign and selects
again). Each size and mode runs in a fresh driver process, which starts its own local Ray: the
raylet and the workers are other processes, so the driver's peak resident memory (its VmHWM, read at
its end) is the driver's alone.

    .venv/bin/python benchmarks/scale_driver.py [--sizes 1000000 10000000] [--k 1000] [--save FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DRIVER = r"""
import json, sys
from pipelines.cli import run
from pipelines.cli.config import validate_config
manifest = run(validate_config(json.loads(sys.argv[1])))
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"peak_rss_kb": int(hwm), "timings_s": manifest["timings_s"],
                  "reused": {s: v["reused"] for s, v in manifest["stages"].items()},
                  "counts": manifest["counts"], "select": {k: manifest["stages"]["select"].get(k)
                  for k in ("refine_passes", "boundary_values")}}))
"""


def write_embeddings(root: str, n: int, d: int, rows_per_file: int, true_k: int = 2000, seed: int = 0,
                     sample_seed: int | None = None, first_file: int = 0, key_prefix: str = "") -> None:
    """Clustered unit vectors in float16, written a file at a time (memory bounded by one file).
    The centres come from `seed`; the samples from the same stream, or from `sample_seed` (new
    samples around the same centres, benchmarks/extend_cost.py), in files numbered from `first_file`."""
    if os.path.exists(os.path.join(root, "_done")):
        return
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((true_k, d)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    if sample_seed is not None:
        rng = np.random.default_rng(sample_seed)
    for f, start in enumerate(range(0, n, rows_per_file)):
        m = min(rows_per_file, n - start)
        x = centers[rng.integers(0, true_k, m)] + 0.35 * rng.standard_normal((m, d)).astype(np.float32) / np.sqrt(d)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float16).reshape(-1), pa.float16()), d)
        keys = pa.array([f"{key_prefix}{i:012d}" for i in range(start, start + m)], pa.string())
        pq.write_table(pa.table({"key": keys, "embedding": emb}), os.path.join(root, f"part-{first_file + f:05d}.parquet"))
    open(os.path.join(root, "_done"), "w").close()


def drive(cfg: dict, driver: str = DRIVER) -> dict:
    """`driver` (Python source) in a fresh process with `cfg` as its argument -> its last line's JSON and the wall time."""
    t0 = time.time()
    res = subprocess.run([sys.executable, "-c", driver, json.dumps(cfg)], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"driver failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1]) | {"wall_s": time.time() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--rows-per-file", type=int, default=100_000)
    ap.add_argument("--work", default="/tmp/ssl-prune-scale")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--save")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    rows = []
    for n in args.sizes:
        emb = os.path.join(args.work, f"emb-{n}-{args.dim}")
        t0 = time.time()
        write_embeddings(emb, n, args.dim, args.rows_per_file)
        print(f"n={n:,}: data ready in {time.time() - t0:.0f} s", flush=True)
        out = os.path.join(args.work, f"out-{n}-{args.k}")
        shutil.rmtree(out, ignore_errors=True)
        for balanced in (True, False):
            cfg = {"output": out, "ray": {"num_cpus": args.num_cpus}, "stages": ["import", "prototypes", "assign", "select"],
                   "import_embeddings": {"path": emb}, "kmeans": {"k": args.k, "niter": 20, "seed": 0},
                   "select": {"keep_fraction": 0.5, "policy": "hard", "balanced": balanced}}
            r = drive(cfg)
            rows.append({"n": n, "mode": "balanced" if balanced else "global"} | r)
            print(json.dumps(rows[-1]), flush=True)
    text = report(rows, args)
    print(text)
    if args.save:
        with open(args.save, "w") as f:
            f.write(text + "\n")


def report(rows: list[dict], args) -> str:
    lines = [f"import -> prototypes -> assign -> select (keep 0.5, hard), synthetic d={args.dim} float16 "
             f"embeddings, k={args.k}, {args.num_cpus} CPUs; peak RSS of the driver process alone (Ray's workers "
             "are other processes). 'global' re-selects on the balanced run's outputs (import, prototypes, assign reused).",
             "",
             "| n | mode | stages run | driver peak RSS MB | wall s | stage s per 1M samples | select refine passes "
             "| priorities returned to the driver |",
             "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ran = [s for s, reused in r["reused"].items() if not reused]
        stage_s = sum(v for s, v in r["timings_s"].items() if s in ran)
        lines.append(f"| {r['n']:,} | {r['mode']} | {', '.join(ran)} | {r['peak_rss_kb'] / 1024:.0f} | {r['wall_s']:.0f} | "
                     f"{stage_s / (r['n'] / 1e6):.1f} | {r['select']['refine_passes']} | {r['select']['boundary_values']:,} |")
    if len({r["n"] for r in rows}) > 1:
        lines += ["", "Largest size against the smallest (1.00: flat memory, linear time):", "",
                  "| mode | peak RSS ratio | time per sample ratio |", "| --- | ---: | ---: |"]
        for mode in ("balanced", "global"):
            small, large = (min((r for r in rows if r["mode"] == mode), key=lambda r: r["n"]),
                            max((r for r in rows if r["mode"] == mode), key=lambda r: r["n"]))

            def per(r):
                ran = [s for s, reused in r["reused"].items() if not reused]
                return sum(v for s, v in r["timings_s"].items() if s in ran) / r["n"]

            lines.append(f"| {mode} | {large['peak_rss_kb'] / small['peak_rss_kb']:.2f} | {per(large) / per(small):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
