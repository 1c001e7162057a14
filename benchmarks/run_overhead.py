"""What a whole run costs beyond embedding, and the writer beside `cp`, measured side by side.

On an img2dataset-layout corpus of Fashion-MNIST JPEGs (20,000 samples by default, built with
`ssl-prune demo-data` when the directory does not exist), each as its own `ssl-prune run demo`
process, the way a user runs it (Ray started by the run, wall time from process start to exit):

- embed alone: `stages=[embed]` into a fresh output directory;
- whole run: every stage of configs/demo.yaml (dedup included) into another fresh output directory;
- the same without the dedup stage (`stages=[embed,prototypes,assign,select,write]`), the stages the
  issue's first measurement ran.

Then `cp -r` of the whole run's pruned shards (tars, parquet and stats) to a directory on the same
disk, twice (the first warms the page cache, as the writer's reads of the input tars were warm),
beside the write stage's bytes per second. Prints one table of seconds and ratios. The embed stage
is the same work in every run, yet its time moves by a second or more between runs on a shared
machine, more than everything else costs; so each whole run's ratio is also given with both runs'
embed stages set to the median of all runs' (their seconds beyond it unchanged).

    .venv/bin/python benchmarks/run_overhead.py [--corpus demo/bench-20k] [--count 20000] [--runs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

BIN = os.path.join(os.path.dirname(sys.executable), "ssl-prune")


def cli(*args: str) -> float:
    """Runs `ssl-prune args...`; -> wall seconds (its output is shown only if it fails)."""
    t = time.perf_counter()
    done = subprocess.run([BIN, *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"ssl-prune {' '.join(args)} failed:\n{done.stderr[-4000:]}")
    return time.perf_counter() - t


def manifest_of(out: str) -> dict:
    with open(os.path.join(out, "manifest.json")) as f:
        return json.load(f)


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def cp_seconds(src: str, work: str) -> float:
    """`cp -r src` to a fresh directory in `work`, the faster of two copies (warm reads)."""
    best = float("inf")
    for i in range(2):
        dst = os.path.join(work, f"cp-{i}")
        t = time.perf_counter()
        subprocess.run(["cp", "-r", src, dst], check=True)
        best = min(best, time.perf_counter() - t)
        shutil.rmtree(dst)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="demo/bench-20k")
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=1, help="repeats of each run; the fastest counts")
    args = parser.parse_args()
    if not os.path.isdir(args.corpus):
        cli("demo-data", args.corpus, "--count", str(args.count), "--shard-size", str(args.shard_size))
    work = tempfile.mkdtemp(prefix="ssl-prune-overhead-", dir=os.path.dirname(os.path.abspath(args.corpus)))
    try:
        no_dedup = "stages=[embed,prototypes,assign,select,write]"
        variants = {"whole run (configs/demo.yaml, dedup included)": [], "whole run without dedup": []}
        embed_alone = []  # (wall seconds, manifest) of each run; the fastest counts, with its own manifest
        for r in range(args.runs):
            out = os.path.join(work, f"embed-{r}")
            embed_alone.append((cli("run", "demo", f"input={args.corpus}", f"output={out}", "stages=[embed]"),
                                manifest_of(out), out))
            for v, (name, runs) in enumerate(variants.items()):
                out = os.path.join(work, f"whole-{v}-{r}")
                runs.append((cli("run", "demo", f"input={args.corpus}", f"output={out}", *([no_dedup] if v else [])),
                             manifest_of(out), out))
        e, e_manifest, _ = min(embed_alone, key=lambda run: run[0])
        e_stage = e_manifest["timings_s"]["embed"]
        # the embed stage is the same work in every run, but its time moves by seconds between runs on
        # a shared machine, more than the rest of the run costs: one ratio holds it at the median
        embed_stages = sorted(m["timings_s"]["embed"] for runs in (embed_alone, *variants.values()) for _, m, _ in runs)
        e_median = embed_stages[len(embed_stages) // 2]
        first = next(iter(variants.values()))[0][1]
        print(f"corpus {args.corpus}: {first['counts']['input_samples']} samples; {os.cpu_count()} CPUs; "
              f"each row the fastest of {args.runs} run(s), with that run's own stage times")
        print()
        print("| measure | seconds | ratio |")
        print("| --- | ---: | ---: |")
        print(f"| embed alone (`stages=[embed]`, process wall time) | {e:.1f} | |")
        print(f"| - its embed stage / outside it (start, Ray, manifest) | {e_stage:.2f} / {e - e_stage:.2f} | |")
        for name, runs in variants.items():
            w, manifest, out = min(runs, key=lambda run: run[0])
            t = manifest["timings_s"]
            print(f"| **{name}** (process wall time) | {w:.1f} | embed alone / whole = **{e / w:.2f}** |")
            print(f"| - beyond its embed stage (every other stage, start, Ray, manifest, report) | {w - t['embed']:.2f} "
                  f"| embed alone's: {e - e_stage:.2f} |")
            print(f"| - the same two runs with their embed stages at the median of all {len(embed_stages)} runs' "
                  f"({e_median:.2f} s) | | embed alone / whole = "
                  f"**{(e_median + e - e_stage) / (e_median + w - t['embed']):.2f}** |")
            for stage in manifest["config"]["stages"]:
                if stage in t:
                    print(f"| - {stage} stage | {t[stage]:.2f} | {t[stage] / w:.2f} of the run |")
            print(f"| - outside the stages (start, Ray, manifest, report) | {w - t['total']:.2f} | |")
            pruned = os.path.join(out, "pruned")
            n_bytes = dir_bytes(pruned)
            cp_s = cp_seconds(pruned, work)
            write_rate, cp_rate = n_bytes / t["write"] / 1e6, n_bytes / cp_s / 1e6
            print(f"| - write stage: {manifest['counts']['kept']} samples, {n_bytes / 1e6:.1f} MB at {write_rate:.0f} MB/s; "
                  f"`cp -r` of its output: {cp_rate:.0f} MB/s | {t['write']:.2f} / {cp_s:.2f} "
                  f"| write / cp rate = **{write_rate / cp_rate:.2f}** |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
