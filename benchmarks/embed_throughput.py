"""Embedding throughput on CPU: the pipeline's embed stage against a naive open_clip loop.

Measures, in one run, on the same Fashion-MNIST demo shards and the same random-init weights
(same seed, so every variant runs the identical model):

1. naive: one process reads the tars with `tarfile`, decodes with PIL, applies open_clip's own
   eval transform and calls `model.encode_image` in fp32, batch by batch (what a user would
   write first; the baseline the issue asks the pipeline to beat by 2x);
2. pipeline: the embed stage (`pipelines/stages/embed.py`) on a local Ray (read tasks -> decode tasks ->
   embed actor -> parquet), timed from after `ray.init` to the last `embeddings/*.parquet`, so
   it includes worker start-up and the model load in the actor (reported separately, from
   Ray's timeline, with the summed time of every kind of task, to show where time goes);
3. embedder alone: `prune.embed.decode` + `prune.embed.backends.make_embedder` in this process, fp32 and
   bf16 (weights cast once, autocast for the rest: what the actors do), to show where speed
   comes from and where it is lost.

Each variant's images/s includes reading and decoding. GFLOP/s uses the model's FLOPs per
image (torch's FlopCounterMode on one image) and the variant's time without model load;
"% of matmul peak" relates it to this machine's measured dense matmul rate in the variant's
dtype, about the most a transformer can reach here. The machine may be shared: "other procs"
is how many cores other processes used during a variant (non-zero: that row is slowed down,
re-run). Embedding agreement: cosine between each variant's vectors (the pipeline's as
stored, float16) and the naive fp32 ones, per key.

    .venv/bin/python benchmarks/embed_throughput.py [--images 1000] [--model ViT-B-32] [--batch-size 32]

`--json benchmarks/results/embed_throughput.json` also writes the run's figures as JSON: its
`efficiency` (the pipeline's share of the matmul rate, end to end, model load included) is the
capacity plan's default (prune/plan/measured.py, `MEASURED_EFFICIENCY` copies it).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import io
import json
import logging
import os
import platform
import tarfile
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.cli.config import RunConfig
from pipelines.runtime import RayConfig
from prune import schema
from prune.demo.shards import write_demo_shards
from prune.embed.backends import cpu_supports_bf16, make_embedder, resolve_precision
from prune.embed.decode import decode_batch
from prune.embed.settings import DecodeConfig, EmbedConfig
from prune.io.shards import read_shard
from prune.io.storage import OutputDir
from prune.plan.capacity import image_gflops
from prune.plan.cpu_time import cpu_seconds

EXTS = ["jpg", "jpeg", "png", "webp"]


@contextlib.contextmanager
def quiet():
    """Silence open_clip's "no pretrained weights" warning and similar chatter."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def load_avg() -> float:
    return os.getloadavg()[0]


def measured(fn, *args, **kwargs) -> dict:
    """Run one variant; add the cores other processes used meanwhile (0 on a quiet machine)."""
    busy0, own0 = cpu_seconds()
    t = time.perf_counter()
    res = fn(*args, **kwargs)
    busy1, own1 = cpu_seconds()
    res["others"] = max(0.0, (busy1 - busy0) - (own1 - own0)) / (time.perf_counter() - t)
    return res


def matmul_gflops(dtype: torch.dtype, n: int = 2048, seconds: float = 1.5) -> float:
    """Best dense n x n matmul rate on the current torch threads (the machine's practical peak)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def iter_images(tars):
    """(key, image bytes) for every image member, read with tarfile (the naive reader)."""
    for path in tars:
        with tarfile.open(path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if member.isfile() and ext.lower() in EXTS:
                    yield key, tar.extractfile(member).read()


def run_naive(tars, model_name: str, seed: int, batch_size: int) -> dict:
    import open_clip

    t0 = time.perf_counter()
    torch.manual_seed(seed)  # the same seed and call order as OpenClipEmbedder: identical weights
    with quiet():
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
    model.eval()
    load = time.perf_counter() - t0
    keys, feats, batch = [], [], []

    def flush():
        if batch:
            feats.append(F.normalize(model.encode_image(torch.stack(batch)), dim=-1).numpy())
            batch.clear()

    with torch.inference_mode():
        for key, data in iter_images(tars):
            batch.append(preprocess(Image.open(io.BytesIO(data))))
            keys.append(key)
            if len(batch) == batch_size:
                flush()
        flush()
    wall = time.perf_counter() - t0
    return {"keys": keys, "vecs": np.concatenate(feats), "wall": wall, "load": load, "precision": "fp32",
            "visual": model.visual, "size": open_clip.get_model_preprocess_cfg(model).get("size", 224)}


def run_embedder(tars, embed_cfg: EmbedConfig, batch_size: int) -> dict:
    """prune.embed.decode + the pipeline's embedder, in this process, batch by batch."""
    t0 = time.perf_counter()
    with quiet():
        emb = make_embedder(embed_cfg, "cpu")
    load = time.perf_counter() - t0
    keys, feats, decode_s = [], [], 0.0
    for path in tars:
        t = time.perf_counter()
        samples = [s for s in read_shard(path, EXTS).samples if s.status == schema.STATUS_OK]
        decode_s += time.perf_counter() - t
        for i in range(0, len(samples), batch_size):
            chunk = samples[i : i + batch_size]
            t = time.perf_counter()
            pixels, status = decode_batch([s.member(EXTS)[1] for s in chunk], [s.status for s in chunk],
                                          emb.preprocess, True, 89_478_485)
            decode_s += time.perf_counter() - t
            keys += [s.key for s in chunk]
            feats.append(emb.embed(pixels))
    wall = time.perf_counter() - t0
    return {"keys": keys, "vecs": np.concatenate(feats), "wall": wall, "load": load, "decode": decode_s,
            "precision": resolve_precision(embed_cfg.precision, "cpu")}


def timeline_breakdown() -> dict:
    """Summed duration, count and longest single duration of every kind of Ray task/actor call
    (from ray.timeline)."""
    import ray

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        events = ray.timeline()
    agg = collections.defaultdict(lambda: [0.0, 0, 0.0])
    for e in events:
        cat = e.get("cat", "")
        if e.get("ph") == "X" and cat.startswith("task::") and not any(
            s in cat for s in ("_StatsActor", "Autoscaling", "ActorLocationTracker", "get_location")
        ):
            entry = agg[cat[len("task::"):]]
            entry[0] += e["dur"] / 1e6
            entry[1] += 1
            entry[2] = max(entry[2], e["dur"] / 1e6)
    return dict(agg)


def run_pipeline(shards_dir: str, out_dir: str, args, threads: int) -> dict:
    import ray

    from pipelines.executor import stage_fingerprint
    from pipelines.inputs import resolve_shards
    from pipelines.runtime import connect
    from pipelines.stage import Context
    from pipelines.stages.embed import EmbedStage

    cfg = RunConfig(
        input=shards_dir, output=out_dir,
        ray=RayConfig(num_cpus=os.cpu_count()),
        decode=DecodeConfig(batch_size=args.batch_size, num_cpus=1),
        embed=EmbedConfig(
            model=args.model, allow_random_init=True, seed=args.seed, precision="auto",
            batch_size=args.batch_size, concurrency=args.actors,
            # one actor holding 1 Ray CPU leaves 1 for read/decode tasks; its torch uses every
            # core, since decode of small images needs little and the model needs the rest
            # (--actors N: N actors sharing the cores, each with its share of the threads)
            num_cpus_per_actor=1 / args.actors, torch_threads=max(1, threads // args.actors),
        ),
    )
    t = time.perf_counter()
    connect(cfg.ray)
    ray_start = time.perf_counter() - t
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    busy0, own0 = cpu_seconds()
    t0 = time.perf_counter()
    stage = EmbedStage.from_config(cfg)
    run_ctx = Context(OutputDir(out_dir), resolve_shards(shards_dir))
    run_ctx.fingerprint = stage_fingerprint(stage, "", run_ctx)
    stage.run(run_ctx)
    wall = time.perf_counter() - t0
    busy1, own1 = cpu_seconds()  # before shutdown: the Ray workers must still be alive to count
    others = max(0.0, (busy1 - busy0) - (own1 - own0)) / wall
    tasks = timeline_breakdown()
    ray.shutdown()
    # the actors load the model at the same time: the load's share of the wall time is the longest one
    load = max((longest for name, (_, _, longest) in tasks.items() if "EmbedActor" in name and name.endswith("__init__")),
               default=0.0)
    keys, vecs = [], []
    for name in sorted(os.listdir(os.path.join(out_dir, schema.EMBEDDINGS_DIR))):
        table = pq.read_table(os.path.join(out_dir, schema.EMBEDDINGS_DIR, name))
        col = table.column(schema.EMBEDDING).combine_chunks()
        keys += table.column(schema.KEY).to_pylist()
        vecs.append(col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size))
    return {"keys": keys, "vecs": np.concatenate(vecs), "wall": wall, "load": load, "ray_start": ray_start,
            "tasks": tasks, "precision": resolve_precision("auto", "cpu"), "dtype_stored": str(vecs[0].dtype),
            "others": others}


def agreement(ref: dict, res: dict) -> tuple[float, float]:
    """Min and mean cosine between res's and ref's vectors for the same keys."""
    index = {k: i for i, k in enumerate(ref["keys"])}
    assert len(res["keys"]) == len(ref["keys"]) and all(k in index for k in res["keys"]), "key sets differ"
    a = torch.from_numpy(res["vecs"].astype(np.float32))
    b = torch.from_numpy(ref["vecs"][[index[k] for k in res["keys"]]].astype(np.float32))
    cos = F.cosine_similarity(a, b, dim=-1)
    return float(cos.min()), float(cos.mean())


def cpu_name() -> str:
    return next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")


def results_json(args, n: int, gflops: float, peak: dict, results: dict, pipe: dict) -> dict:
    """The run's figures for programs: the capacity plan reads `efficiency`, the pipeline's images/s
    end to end (model load included) x FLOPs per image over the matmul rate in its dtype."""
    rows = [{"variant": name, "precision": r["precision"], "wall_s": round(r["wall"], 1), "load_s": round(r["load"], 1),
             "images_per_s": round(n / r["wall"], 1), "images_per_s_excl_load": round(n / (r["wall"] - r["load"]), 1)}
            for name, r in results.items()]
    rate = n / pipe["wall"]
    return {
        "benchmark": "benchmarks/embed_throughput.py", "date": datetime.date.today().isoformat(),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}",
        "model": args.model, "images": n, "batch_size": args.batch_size, "torch_threads": args.threads,
        "gflops_per_image": round(gflops, 3), "matmul_gflops": {k: round(v) for k, v in peak.items()},
        "precision": pipe["precision"], "images_per_s": round(rate, 2),
        "efficiency": round(rate * gflops / peak[pipe["precision"]], 4), "variants": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=EmbedConfig().batch_for("cpu"))
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip-embedder", action="store_true", help="leave out variant 3 (in-process embedder)")
    parser.add_argument("--actors", type=int, default=1, help="embed actors in the pipeline variant (embed.concurrency)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON (the capacity plan reads "
                        "benchmarks/results/embed_throughput.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), load_avg()

    with tempfile.TemporaryDirectory(prefix="embed-bench-") as tmp:
        shards_dir = os.path.join(tmp, "shards")
        tars = write_demo_shards(shards_dir, count=args.images, shard_size=args.shard_size)
        peak = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}

        results = {}
        naive = results["naive: tarfile + PIL + open_clip transform, fp32"] = measured(
            run_naive, tars, args.model, args.seed, args.batch_size)
        size = naive["size"]
        gflops = image_gflops(naive.pop("visual"), size if isinstance(size, int) else int(size[0]))
        if not args.skip_embedder:
            base = EmbedConfig(model=args.model, allow_random_init=True, seed=args.seed, torch_threads=args.threads)
            results["embedder in-process, fp32"] = measured(
                run_embedder, tars, base.model_copy(update={"precision": "fp32"}), args.batch_size)
            results["embedder in-process, bf16 weights + autocast (as pipeline)"] = measured(
                run_embedder, tars, base.model_copy(update={"precision": "bf16"}), args.batch_size)
        actors = f"{args.actors} actor{'s' if args.actors > 1 else ''}, {max(1, args.threads // args.actors)} torch thread(s) each"
        pipe = results[f"pipeline: embed stage on Ray ({actors})"] = run_pipeline(
            shards_dir, os.path.join(tmp, "out"), args, args.threads)

    n = len(naive["keys"])
    print(f"\nMachine: {cpu_name()}, {os.cpu_count()} cores, torch threads {args.threads}, "
          f"CPU bf16 (avx512_bf16/amx): {cpu_supports_bf16()}, torch {torch.__version__}, {platform.python_version()}")
    print(f"Load average (1 min) before/after: {load_before:.2f}/{load_avg():.2f} "
          f"(above ~0.5 at start, other processes share the cores)")
    print(f"Matmul rate ({2048}^3): fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s")
    print(f"Model {args.model} (random init, seed {args.seed}): {gflops:.2f} GFLOPs/image; "
          f"{n} images, {len(tars)} shards, batch {args.batch_size}\n")

    base_rate = n / naive["wall"]
    print("| variant | precision | wall s | model load s | img/s | img/s excl. load | x naive | GFLOP/s | % of matmul peak | other procs (cores) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        rate, rate_x = n / r["wall"], n / (r["wall"] - r["load"])
        achieved = rate_x * gflops
        print(f"| {name} | {r['precision']} | {r['wall']:.1f} | {r['load']:.1f} | {rate:.1f} | {rate_x:.1f} | "
              f"{rate / base_rate:.2f} | {achieved:.0f} | {100 * achieved / peak[r['precision']]:.0f}% | {r['others']:.2f} |")
    print("\nimg/s includes reading + decoding + model load; x naive compares img/s end to end. "
          "GFLOP/s and % of peak use the time without model load, against the matmul rate of the variant's dtype. "
          "Other procs: cores that other processes used during the variant (not 0: the row is slowed by them).")

    print("\nEmbedding agreement with naive fp32 (cosine per key):")
    for name, r in results.items():
        if r is not naive:
            lo, mean = agreement(naive, r)
            print(f"- {name}: min {lo:.5f}, mean {mean:.5f}")

    print(f"\nPipeline detail: Ray start-up {pipe['ray_start']:.1f} s (excluded), embeddings stored as "
          f"{pipe['dtype_stored']}; summed task time from ray.timeline (overlapping, 2 cores):")
    # per actor: the actors embed side by side, each its share of the images
    embed_calls = sum(d for name, (d, _, _) in pipe["tasks"].items() if "EmbedActor" in name and name.endswith("submit"))
    embed_calls /= args.actors
    for name, (dur, count, _) in sorted(pipe["tasks"].items(), key=lambda kv: -kv[1][0]):
        print(f"  {dur:7.1f} s  {count:4d} x  {name}")
    if embed_calls:
        print(f"  -> the actors' embed calls alone: {n / embed_calls:.1f} img/s; wall minus model load minus embed "
              f"calls: {pipe['wall'] - pipe['load'] - embed_calls:.1f} s (start-up, pipeline fill/drain, finalize)")
    for name, r in results.items():
        if "decode" in r:
            print(f"  (in-process '{name}': read+decode {r['decode']:.1f} s = {1e3 * r['decode'] / n:.1f} ms/image)")
    print(f"\nTotal benchmark time {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results_json(args, n, gflops, peak, results, pipe), f, indent=1)
            f.write("\n")
        print(f"Figures in {args.json}")


if __name__ == "__main__":
    main()
