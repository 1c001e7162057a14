"""Embed throughput on one GPU, end to end (read -> decode -> embed -> write), and each part's own rate.

On `--images` synthetic web photos (prune/demo/photos.py: JPEGs of 256-1024 px, LAION's 40-60 KB,
made in parallel on every core, untimed), this measures:

1. end to end: the pipeline's embed stage (`pipelines/stages/embed.py`) on a local Ray holding every
   core and the GPU: read tasks -> CPU decode tasks -> one embed actor on the GPU (bf16) ->
   `embeddings/*.parquet`, timed from the stage's start to its last file (worker start, the model
   load and the pipeline's fill and drain included), with the steady rate between the actor's
   first and last batch, the GPU's utilization (nvidia-smi, every 200 ms) and the cores' (/proc);
2. each part on its own, to say which one limits: CPU decode (PIL, draft mode, the model's crop:
   one core, then every core in parallel processes), host-to-device transfer (uint8 batches, pinned
   and as the actor copies them), the model (ViT-B-32 bf16 forward on batches already on the GPU),
   one actor call as the pipeline makes it (uint8 batch in host memory -> unit vectors in host
   memory), and decode on the GPU instead (`torchvision.io.decode_jpeg(device="cuda")`, nvJPEG,
   plus the same resize and crop on the GPU; standalone, not a pipeline path).

Weights are random-init (`embed.allow_random_init`; nothing is downloaded): a model's speed does not
depend on its weights' values, so the rates are those of the trained ViT-B-32. The anchor: NeMo
Curator's nightly image benchmark asks 900 img/s on 8 GPUs (112 per GPU) for read -> CLIP -> write;
ours should reach 2,000 img/s end to end on one H100 with 16 cores. The CPU benchmark is in
docs/performance.md, "Embed throughput"; benchmarks/README.md says how the GPU check runs this one.

    .venv/bin/python benchmarks/gpu_throughput.py [--images 40000] [--batch-size 512] [--out FILE] [--json FILE]
    .venv/bin/python benchmarks/gpu_throughput.py --device cpu --images 200   # the code path, on CPU

Without a CUDA device (and without `--device cpu`) it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import numpy as np

NEMO_PER_GPU = 900 / 8  # NeMo Curator's nightly image benchmark: 900 img/s on 8 GPUs
TARGET = 2000.0  # img/s end to end on one H100 with 16 cores
EXTS = ["jpg", "jpeg", "png", "webp"]


def cuda_status() -> tuple[bool, str]:
    """(usable, why not): torch's view, its warnings (an old driver, say) folded into the reason."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch

            ok = torch.cuda.is_available()
    except Exception as exc:  # noqa: BLE001 - a broken install is a reason too
        return False, f"torch does not import ({type(exc).__name__}: {exc})"
    if ok:
        return True, ""
    why = "; ".join(str(w.message).splitlines()[0] for w in caught)
    return False, "torch.cuda.is_available() is False" + (f" ({why})" if why else "")


# --- 2. each part on its own --------------------------------------------------------------------


def timed_rate(fn, per_call: int, seconds: float, sync=None, warmup: int = 2) -> float:
    """Images per second of `fn()` (each call `per_call` images) called for about `seconds`."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        if sync:
            sync()
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return calls * per_call / elapsed


def _decode_chunk(job) -> int:
    from prune.embed.decode import decode_batch

    images, spec = job
    return len(decode_batch(images, ["ok"] * len(images), spec, True, 89_478_485)[0])


def decode_rates(jpegs: list[bytes], spec, cores: int) -> dict:
    """PIL decode + crop: one core in this process, then `cores` processes side by side."""
    from prune.embed.decode import decode_batch

    few = jpegs[: min(len(jpegs), 500)]
    t = time.perf_counter()
    decode_batch(few, ["ok"] * len(few), spec, True, 89_478_485)
    one = len(few) / (time.perf_counter() - t)
    todo = (jpegs * (cores * 320 // len(jpegs) + 1))[: max(len(jpegs), cores * 320)]  # ~1 s of work or more
    chunks = [(todo[i : i + 64], spec) for i in range(0, len(todo), 64)]
    with multiprocessing.get_context("forkserver").Pool(cores) as pool:
        pool.map(_decode_chunk, chunks[:cores], chunksize=1)  # the workers start and import, untimed
        t = time.perf_counter()
        n = sum(pool.map(_decode_chunk, chunks, chunksize=1))
        every = n / (time.perf_counter() - t)
    return {"decode_one_core": one, "decode_all_cores": every, "cores": cores, "images": n}


def gpu_resize_crop(img, size: int):
    """A CHW uint8 CUDA image -> the model's crop: the shorter side to `size` (bicubic, antialiased,
    as PIL), then the centre (prune/embed/decode.py's geometry, `resize_mode: shortest`)."""
    import torch
    import torch.nn.functional as F

    h, w = img.shape[-2:]
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    out = F.interpolate(img[None].float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return out[0, :, top : top + size, left : left + size].clamp_(0, 255).round_().to(torch.uint8)


def gpu_decode(jpegs: list[bytes], size: int):
    """nvJPEG batch decode + resize/crop on the GPU -> uint8 NHWC on the GPU (and how many failed)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
    try:
        images = decode_jpeg(datas, mode=ImageReadMode.RGB, device="cuda")
        failed = 0
    except RuntimeError:  # one bad file fails the batch: decode one by one, count the failures
        images, failed = [], 0
        for d in datas:
            try:
                images.append(decode_jpeg(d, mode=ImageReadMode.RGB, device="cuda"))
            except RuntimeError:
                failed += 1
    crops = torch.stack([gpu_resize_crop(im, size) for im in images])
    return crops.permute(0, 2, 3, 1).contiguous(), failed


def part_rates(jpegs: list[bytes], model: str, batch: int, device: str, seconds: float) -> dict:
    """Transfer, model, actor call and GPU decode, in this process (after the pipeline's Ray is gone)."""
    import torch

    from prune.embed.backends import make_embedder
    from prune.embed.decode import decode_batch, normalize
    from prune.embed.settings import EmbedConfig

    cfg = EmbedConfig(model=model, allow_random_init=True, precision="auto", batch_size=batch)
    t = time.perf_counter()
    emb = make_embedder(cfg, device)
    load_s = time.perf_counter() - t
    spec, size = emb.preprocess, emb.preprocess.size
    sample = (jpegs * (batch // len(jpegs) + 1))[:batch]
    crops, _ = decode_batch(sample, ["ok"] * batch, spec, True, 89_478_485)
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else None
    out = {"precision": emb.precision, "model_load_s": load_s, "batch": batch, "crop": size}
    with torch.inference_mode():
        x = normalize(crops, spec, device)
        out["model"] = timed_rate(lambda: emb._forward(x), batch, seconds, sync)
        out["actor_call"] = timed_rate(lambda: emb.embed(crops), batch, seconds, sync)
        if cuda:
            pinned = torch.from_numpy(crops).pin_memory()
            out["transfer_pinned"] = timed_rate(lambda: pinned.to(device, non_blocking=True), batch, seconds, sync)
            out["transfer_pageable"] = timed_rate(lambda: torch.from_numpy(crops).to(device), batch, seconds, sync)
            # what the actor does per batch: pin a fresh copy, copy it over, normalize there
            out["transfer_as_actor"] = timed_rate(lambda: normalize(crops, spec, device), batch, seconds, sync)
            out["transfer_gb_s"] = out["transfer_pinned"] * crops[0].nbytes / 1e9
            out |= gpu_decode_rates(emb, jpegs, crops, size, min(batch, len(jpegs)), seconds, sync)
    return out


def gpu_decode_rates(emb, jpegs, crops, size, batch, seconds, sync) -> dict:
    """nvJPEG's rate on batches of the JPEG bytes, and how its crops differ from PIL's."""
    try:
        sample = jpegs[:batch]
        rate = timed_rate(lambda: gpu_decode(sample, size), len(sample), seconds, sync)
        gcrops, failed = gpu_decode(sample, size)
        gcrops = gcrops.cpu().numpy()
        pil = crops[: len(sample)]
        cos = (emb.embed(gcrops) * emb.embed(pil)).sum(axis=1)
        return {"gpu_decode": rate, "gpu_decode_failed": failed,
                "gpu_decode_pixel_diff": float(np.abs(gcrops.astype(np.int16) - pil.astype(np.int16)).mean()),
                "gpu_decode_cos_min": float(cos.min())}
    except Exception as exc:  # noqa: BLE001 - an optional path: say why it is missing
        return {"gpu_decode": None, "gpu_decode_error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}


# --- 1. the pipeline end to end -------------------------------------------------------------------


class GpuSampler:
    """nvidia-smi's utilization.gpu and memory.used of one GPU every 200 ms, timestamped here."""

    def __init__(self, index: str):
        self.samples: list[tuple[float, float, float]] = []
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", f"--id={index}", "--query-gpu=utilization.gpu,memory.used",
                 "--format=csv,noheader,nounits", "-lms", "200"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.proc = None
            return
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                util, mem = (float(v) for v in line.split(","))
            except ValueError:
                continue
            self.samples.append((time.time(), util, mem))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()

    def between(self, t0: float, t1: float) -> dict:
        util = [u for t, u, _ in self.samples if t0 <= t <= t1]
        mem = [m for t, _, m in self.samples if t0 <= t <= t1]
        return {"mean": float(np.mean(util)), "p50": float(np.median(util)), "n": len(util),
                "mem_max_mib": float(max(mem))} if util else None


def actor_window(events: list) -> tuple[float, float, float, float]:
    """(first start, last end) of the embed actor's batch calls, epoch seconds; (the model load's
    longest duration, the calls' summed seconds)."""
    calls = [e for e in events if e.get("ph") == "X" and "EmbedActor" in e.get("cat", "")]
    batches = [e for e in calls if not e["cat"].endswith("__init__")]
    inits = [e["dur"] / 1e6 for e in calls if e["cat"].endswith("__init__")]
    if not batches:
        return 0.0, 0.0, max(inits, default=0.0), 0.0
    return (min(e["ts"] for e in batches) / 1e6, max(e["ts"] + e["dur"] for e in batches) / 1e6,
            max(inits, default=0.0), sum(e["dur"] for e in batches) / 1e6)


def run_pipeline(shards_dir: str, out_dir: str, args, device: str) -> dict:
    import contextlib
    import io

    import pyarrow.parquet as pq
    import ray
    import torch
    from embed_throughput import timeline_breakdown  # this directory's: the same per-task sums

    from pipelines.executor import stage_fingerprint
    from pipelines.inputs import resolve_shards
    from pipelines.runtime import quiet_ray_data
    from pipelines.stage import Context
    from pipelines.stages.embed import EmbedStage
    from prune import schema
    from prune.embed.settings import DecodeConfig, EmbedConfig
    from prune.io.storage import OutputDir
    from prune.plan.cpu_time import cpu_seconds

    # the GPUs as torch counts them (Ray's own detection may miss a GPU torch uses)
    ray.init(address="local", num_cpus=args.cpus, num_gpus=torch.cuda.device_count() if device == "cuda" else 0,
             include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    quiet_ray_data()
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    stage = EmbedStage(
        embed=EmbedConfig(model=args.model, allow_random_init=True, device=device, batch_size=args.batch_size,
                          concurrency=args.actors, num_cpus_per_actor=args.actor_cpus),
        decode=DecodeConfig(batch_size=args.decode_batch, num_cpus=args.decode_cpus))
    stage.setup()
    ctx = Context(OutputDir(out_dir), resolve_shards(shards_dir))
    ctx.fingerprint = stage_fingerprint(stage, "", ctx)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    sampler = GpuSampler(visible) if device == "cuda" else None
    busy0, _ = cpu_seconds()
    t0 = time.time()
    stats = stage.run(ctx)
    t1 = time.time()
    busy1, _ = cpu_seconds()
    if sampler:
        sampler.stop()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        events = ray.timeline()
    tasks = timeline_breakdown()
    ray.shutdown()
    first, last, load, calls = actor_window(events)
    rows = ok = 0
    for name in os.listdir(os.path.join(out_dir, schema.EMBEDDINGS_DIR)):
        status = pq.read_table(os.path.join(out_dir, schema.EMBEDDINGS_DIR, name), columns=[schema.STATUS])
        rows += status.num_rows
        ok += sum(s == schema.STATUS_OK for s in status.column(0).to_pylist())
    return {"wall": t1 - t0, "first_call": first - t0 if first else None, "steady_s": last - first,
            "model_load": load, "actor_calls_s": calls, "tasks": tasks, "rows": rows, "ok": ok,
            "cores_busy": (busy1 - busy0) / (t1 - t0), "actor_resources": stats.actor_resources,
            "actors_ran": stats.actors_ran,
            "gpu_util": sampler.between(t0, t1) if sampler else None,
            "gpu_util_steady": sampler.between(first, last) if sampler and first else None}


# --- the results --------------------------------------------------------------------------------


def fmt(rate) -> str:
    return "n/a" if rate is None else f"{rate:,.0f}"


def verdict(pipe: dict, parts: dict, dec: dict) -> tuple[str, dict]:
    """The part that limits (the slowest standalone rate) and each part's rate, in img/s."""
    rates = {"decode (CPU, PIL, all cores)": dec["decode_all_cores"],
             "transfer (host -> GPU, as the actor copies)": parts.get("transfer_as_actor"),
             "model (forward on batches on the device)": parts["model"]}
    known = {k: v for k, v in rates.items() if v}
    return min(known, key=known.get), rates


def report(args, device: str, gen: dict, dec: dict, pipe: dict, parts: dict) -> tuple[str, dict]:
    import torch

    n = pipe["ok"]
    e2e, steady = n / pipe["wall"], (n / pipe["steady_s"] if pipe["steady_s"] else None)
    limit, rates = verdict(pipe, parts, dec)
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "none (CPU run)"
    L = [f"# gpu_throughput: {datetime.datetime.now().isoformat(timespec='seconds')}",
         f"device: {gpu}; {os.cpu_count()} cores ({args.cpus} to Ray); torch {torch.__version__}; Python "
         f"{platform.python_version()}; model {args.model} random-init (speed as trained weights), "
         f"{parts['precision']}; embed batch {args.batch_size}, decode batch {args.decode_batch}, "
         f"{args.actors} actor(s) x {args.actor_cpus} CPU, decode tasks {args.decode_cpus} CPU each",
         f"images: {n:,} ok of {pipe['rows']:,} ({gen['shards']} shards, {gen['mean_kb']:.0f} KB and "
         f"{gen['mean_mpix']:.2f} Mpx per JPEG on average; made in {gen['seconds']:.0f} s, untimed)", "",
         "## End to end: read -> decode -> embed -> write (the embed stage on a local Ray)", "",
         "| measure | value |", "| --- | ---: |",
         f"| **img/s end to end** (stage start to last parquet; worker start, model load, fill, drain included) "
         f"| **{e2e:,.0f}** |",
         f"| img/s steady (the actor's first batch to its last) | {fmt(steady)} |",
         f"| wall s / to the actor's first batch s / model load in the actor s | {pipe['wall']:.1f} / "
         f"{pipe['first_call'] or 0:.1f} / {pipe['model_load']:.1f} |",
         f"| actor busy (its batch calls / steady window) | "
         f"{100 * pipe['actor_calls_s'] / pipe['steady_s'] if pipe['steady_s'] else 0:.0f}% |",
         f"| cores busy on average (of {os.cpu_count()}) | {pipe['cores_busy']:.1f} |",
         f"| the actors asked for / ran on (the manifest's actor_resources / actors_ran) | "
         f"{pipe['actor_resources']} / {pipe['actors_ran']} |"]
    for key, what in (("gpu_util", "whole stage"), ("gpu_util_steady", "steady window")):
        u = pipe[key]
        L.append(f"| GPU utilization, {what} (nvidia-smi, mean / median; peak memory) | "
                 + (f"{u['mean']:.0f}% / {u['p50']:.0f}%; {u['mem_max_mib']:,.0f} MiB |" if u else "n/a |"))
    decode_s = sum(d for name, (d, _, _) in pipe["tasks"].items() if "decode_rows" in name)
    L.append(f"| decode vs model time per image, in the pipeline (summed task time / images) | "
             f"{1e3 * decode_s / n:.2f} ms CPU vs {1e3 * pipe['actor_calls_s'] / n:.3f} ms actor |")
    L += ["", "## Each part on its own (img/s)", "", "| part | img/s | note |", "| --- | ---: | --- |",
          f"| decode, one core (PIL, draft mode, to the {parts['crop']} px crop) | {fmt(dec['decode_one_core'])} | "
          f"x {dec['cores']} cores = {fmt(dec['decode_one_core'] * dec['cores'])} |",
          f"| **decode, all {dec['cores']} cores** (parallel processes, {dec['images']:,} decodes) | "
          f"**{fmt(dec['decode_all_cores'])}** | the pipeline's decode tasks share these cores with read, staging "
          f"and the actor |"]
    if device == "cuda":
        L += [f"| transfer, pinned uint8 batch host -> GPU | {fmt(parts['transfer_pinned'])} | "
              f"{parts['transfer_gb_s']:.1f} GB/s |",
              f"| transfer, pageable uint8 batch | {fmt(parts['transfer_pageable'])} | |",
              f"| **transfer as the actor does it** (pin a copy, copy over, normalize there) | "
              f"**{fmt(parts['transfer_as_actor'])}** | |"]
    else:
        L.append("| transfer host -> GPU | n/a | CPU run |")
    L += [f"| **model** ({parts['precision']} forward, batch {parts['batch']} on the device) | **{fmt(parts['model'])}** | |",
          f"| one actor call (uint8 in host memory -> unit vectors in host memory) | {fmt(parts['actor_call'])} | |",
          f"| decode on the GPU (nvJPEG batch + resize/crop on GPU; standalone) | {fmt(parts.get('gpu_decode'))} | "
          + (f"crops vs PIL: mean |diff| {parts['gpu_decode_pixel_diff']:.2f}/255, embedding cosine min "
             f"{parts['gpu_decode_cos_min']:.4f}; {parts['gpu_decode_failed']} failed |" if parts.get("gpu_decode")
             else f"{parts.get('gpu_decode_error', 'CPU run')} |")]
    share = e2e / rates[limit]
    L += ["", "## Verdict", "",
          f"- limiting part: **{limit}** at {fmt(rates[limit])} img/s; end to end reaches {100 * share:.0f}% of it "
          f"({'the pipeline itself (start-up, model load, scheduling, fill/drain) loses the rest' if share < 0.8 else 'the pipeline adds little'}).",
          f"- target {TARGET:,.0f} img/s end to end: **{'met' if e2e >= TARGET else 'not met'}** ({e2e:,.0f} over "
          f"{n:,} images, start-up and model load included: a larger run tends to the steady rate, "
          f"{fmt(steady)}, {'which meets it' if steady and steady >= TARGET else 'which does not meet it either'}). "
          f"NeMo Curator's nightly asks {NEMO_PER_GPU:.0f} img/s per GPU: {e2e / NEMO_PER_GPU:.1f}x that."]
    per_core = dec["decode_all_cores"] / dec["cores"]
    L.append(f"- CPU decode does {per_core:,.0f} img/s per core here: {TARGET:,.0f} img/s needs {TARGET / per_core:.0f} "
             f"cores decoding, the model's {fmt(parts['model'])} img/s {parts['model'] / per_core:.0f}.")
    if parts.get("gpu_decode") and parts.get("model"):
        both = 1 / (1 / parts["gpu_decode"] + 1 / parts["model"])
        L.append(f"- with nvJPEG decode in the actor instead of CPU decode (not built), the GPU would do decode + "
                 f"model at about {both:,.0f} img/s, leaving the CPUs only reading, against "
                 f"{fmt(dec['decode_all_cores'])} img/s of CPU decode on {dec['cores']} cores.")
    figures = {"benchmark": "benchmarks/gpu_throughput.py", "date": datetime.date.today().isoformat(),
               "device": gpu, "cores": os.cpu_count(), "model": args.model, "images": n,
               "e2e_images_per_s": e2e, "steady_images_per_s": steady, "limit": limit, "rates": rates,
               "target_met": e2e >= TARGET, "pipeline": {k: v for k, v in pipe.items() if k != "tasks"},
               "parts": parts, "decode": dec, "generation": gen}
    return "\n".join(L) + "\n", figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=40000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="auto: the GPU, else skip in one line; cpu: a smoke run of the code path")
    parser.add_argument("--batch-size", type=int, default=512, help="embed.batch_size (configs/laion.yaml's)")
    parser.add_argument("--decode-batch", type=int, default=256, help="decode.batch_size")
    parser.add_argument("--decode-cpus", type=float, default=1.0, help="decode.num_cpus (Ray CPUs per decode task)")
    parser.add_argument("--actors", type=int, default=1, help="embed.concurrency (one GPU each)")
    parser.add_argument("--actor-cpus", type=float, default=1.0, help="embed.num_cpus_per_actor")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    parser.add_argument("--part-images", type=int, default=2048, help="JPEGs the standalone rates use")
    parser.add_argument("--part-seconds", type=float, default=2.0, help="seconds per standalone rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default=None, help="where to work (default: a temporary directory)")
    parser.add_argument("--out", default=None, help="write the report there too (Markdown)")
    parser.add_argument("--json", default=None, help="write the figures there as JSON")
    args = parser.parse_args()

    device = args.device
    if device != "cpu":
        usable, why = cuda_status()
        if not usable:
            if device == "cuda":
                print(f"gpu_throughput: error, --device cuda but {why}", file=sys.stderr)
                return 2
            print(f"gpu_throughput: skipped, no CUDA device ({why}); --device cpu runs the code path on CPU")
            return 0
        device = "cuda"

    from prune.demo.photos import write_photo_shards
    from prune.embed.backends import preprocess_spec_for
    from prune.embed.settings import EmbedConfig
    from prune.io.shards import read_shard

    started = time.perf_counter()
    work = tempfile.mkdtemp(prefix="ssl-prune-gpu-", dir=args.dir)
    try:
        t = time.perf_counter()
        shards_dir = os.path.join(work, "shards")
        tars = write_photo_shards(shards_dir, args.images, args.shard_size, args.seed)
        jpegs = []
        for tar in tars:
            jpegs += [s.member(EXTS)[1] for s in read_shard(tar, EXTS).samples]
            if len(jpegs) >= args.part_images:
                break
        jpegs = jpegs[: args.part_images]
        gen = {"seconds": time.perf_counter() - t, "shards": len(tars), "mean_kb": np.mean([len(b) for b in jpegs]) / 1024,
               "mean_mpix": mean_megapixels(jpegs)}
        print(f"gpu_throughput: {args.images:,} photos in {len(tars)} shards made in {gen['seconds']:.0f} s", flush=True)
        spec = preprocess_spec_for(EmbedConfig(model=args.model, allow_random_init=True))
        dec = decode_rates(jpegs, spec, os.cpu_count() or 1)
        print(f"gpu_throughput: CPU decode {dec['decode_all_cores']:,.0f} img/s on {dec['cores']} cores", flush=True)
        pipe = run_pipeline(shards_dir, os.path.join(work, "out"), args, device)
        print(f"gpu_throughput: end to end {pipe['ok'] / pipe['wall']:,.0f} img/s ({pipe['wall']:.1f} s)", flush=True)
        parts = part_rates(jpegs, args.model, args.batch_size, device, args.part_seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text, figures = report(args, device, gen, dec, pipe, parts)
    text += f"\nTotal benchmark time {time.perf_counter() - started:.0f} s (photo generation included)\n"
    print(text)
    if args.out:
        write_file(args.out, text)
    if args.json:
        write_file(args.json, json.dumps(figures, indent=1, default=str) + "\n")
    return 0


def mean_megapixels(jpegs: list[bytes]) -> float:
    import io

    from PIL import Image

    return float(np.mean([np.prod(Image.open(io.BytesIO(b)).size) for b in jpegs[:500]]) / 1e6)


def write_file(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
