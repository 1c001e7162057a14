"""What an extend costs against a full re-run: N new samples curated against a parent of M.

Synthetic clustered embeddings (as benchmarks/scale_driver.py makes them: d=256 float16, Parquet
files of 100k rows), the new ones drawn around the same centres. Three jobs, each in a fresh
driver process (its own local Ray; the driver's peak RSS is its VmHWM): the parent over M
(`stages=[import, prototypes, assign, dedup, select]`), `extend` with the N new samples (import,
assign to the parent's centroids, drift, dedup against the parent's survivors in the clusters they
fall in, select by the parent's thresholds), and a full re-run over M + N.

    .venv/bin/python benchmarks/extend_cost.py [--parent 1000000] [--new 100000] [--k 1000] [--save FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil


def _scale_driver():
    """benchmarks/scale_driver.py (a script, not a package): its synthetic embeddings and driver runner."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("scale_driver", os.path.join(os.path.dirname(__file__), "scale_driver.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

DRIVER = r"""
import json, sys
from pipelines.cli import run
from pipelines.cli.config import validate_config
from pipelines.cli import extend
job = json.loads(sys.argv[1])
manifest = extend(job["parent"], job["overrides"]) if "parent" in job else run(validate_config(job["config"]))
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"peak_rss_kb": int(hwm), "timings_s": manifest["timings_s"], "counts": manifest["counts"],
                  "reused": {s: v["reused"] for s, v in manifest["stages"].items()},
                  "dedup": {k: manifest["stages"].get("dedup", {}).get(k) for k in ("removed", "compared_with_earlier_runs")},
                  "drift": (manifest["stages"].get("drift") or {}).get("record", {}).get("share_beyond_parent_p95")}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parent", type=int, default=1_000_000)
    ap.add_argument("--new", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--rows-per-file", type=int, default=100_000)
    ap.add_argument("--eps", type=float, default=0.002)
    ap.add_argument("--work", default="/tmp/ssl-prune-extend")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--save")
    args = ap.parse_args()
    sd = _scale_driver()
    old, new, both = (os.path.join(args.work, f"emb-{name}") for name in ("old", "new", "both"))
    sd.write_embeddings(old, args.parent, args.dim, args.rows_per_file, sample_seed=1, key_prefix="old-")
    sd.write_embeddings(new, args.new, args.dim, args.rows_per_file, sample_seed=2, key_prefix="new-",
                     first_file=-(-args.parent // args.rows_per_file))
    if not os.path.exists(os.path.join(both, "_done")):  # the full re-run's input: the same files
        shutil.rmtree(both, ignore_errors=True)
        os.makedirs(both)
        for d in (old, new):
            for name in os.listdir(d):
                if name.endswith(".parquet"):
                    os.link(os.path.join(d, name), os.path.join(both, name))
        open(os.path.join(both, "_done"), "w").close()
    base = {"ray": {"num_cpus": args.num_cpus}, "stages": ["import", "prototypes", "assign", "dedup", "select"],
            "kmeans": {"k": args.k, "niter": 20, "seed": 0}, "dedup": {"eps": args.eps},
            "select": {"keep_fraction": 0.5, "policy": "hard", "balanced": True}}
    rows = []
    for name, job in (
        ("parent (M)", {"config": base | {"output": f"{args.work}/parent", "import_embeddings": {"path": old}}}),
        ("extend (N)", {"parent": f"{args.work}/parent",
                        "overrides": [f"import_embeddings.path={new}", f"output={args.work}/extend"]}),
        ("full re-run (M + N)", {"config": base | {"output": f"{args.work}/full", "import_embeddings": {"path": both}}}),
    ):
        for out in (f"{args.work}/parent", f"{args.work}/extend", f"{args.work}/full") if name.startswith("parent") else ():
            shutil.rmtree(out, ignore_errors=True)  # every job from scratch: its whole cost
        r = sd.drive(job, DRIVER)
        rows.append({"job": name} | r)
        print(json.dumps(rows[-1]), flush=True)
    text = report(rows, args)
    print(text)
    if args.save:
        with open(args.save, "w") as f:
            f.write(text + "\n")


def report(rows: list[dict], args) -> str:
    lines = [f"M = {args.parent:,} parent samples, N = {args.new:,} new ones around the same centres; synthetic d={args.dim} "
             f"float16 embeddings, k={args.k}, dedup eps {args.eps}, dbp-free balanced hard select at 0.5; {args.num_cpus} CPUs.",
             "", "| job | samples | wall s | stage s | driver peak RSS MB | dedup: removed / earlier survivors read | "
             "drift: beyond the parent's p95 |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        stage_s = sum(v for s, v in r["timings_s"].items() if s != "total" and not r["reused"].get(s, False))
        d = r["dedup"]
        drift = "–" if r["drift"] is None else f"{r['drift']:.1%}"
        lines.append(f"| {r['job']} | {r['counts']['input_samples']:,} | {r['wall_s']:.0f} | {stage_s:.0f} | "
                     f"{r['peak_rss_kb'] / 1024:.0f} | {d['removed'] or 0:,} / {d['compared_with_earlier_runs'] or 0:,} | {drift} |")
    ext, full = rows[1], rows[2]
    lines += ["", f"extend / full re-run: wall {ext['wall_s'] / full['wall_s']:.2f}, "
                  f"driver peak RSS {ext['peak_rss_kb'] / full['peak_rss_kb']:.2f}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
