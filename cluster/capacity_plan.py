#!/usr/bin/env python
"""Capacity plan for a LAION-scale `ssl-prune run`: hours and cost per stage, as a Markdown table.

    python cluster/capacity_plan.py                                # LAION-400M and 2B x ViT-B-32 and ViT-L-14
    python cluster/capacity_plan.py --dataset LAION-2B --model ViT-L-14 --gpu H100 --num-gpus 64 \
        --gpu-node-usd-per-hour 6.9 --cpu-nodes 16
    python cluster/capacity_plan.py --measure-decode --measure-flops   # re-measure on this machine
    python cluster/capacity_plan.py --kmeans-device gpu --assign-device gpu   # what GPU k-means would give

Every rate is an estimate (see prune/plan/capacity.py for where each default comes from); plug in your
own cluster, prices and measured rates. The formulas live in `prune/plan/capacity.py`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from prune.plan import capacity
from prune.plan.gpus import gpu_table

DATASETS = {"LAION-400M": 400_000_000, "LAION-2B": 2_320_000_000}  # LAION-2B-en: 2.32B pairs


def measure_flops(model: str) -> float:
    """GFLOPs per image of an open_clip image tower (random init)."""
    import open_clip

    visual = open_clip.create_model(model, pretrained=None).visual.eval()
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    return capacity.image_gflops(visual, size)


def _sample_jpegs(count: int = 200, seed: int = 0) -> list[bytes]:
    """256 x 256 JPEGs (quality 95, img2dataset's defaults) cut from a real photo shipped with matplotlib."""
    import matplotlib
    import numpy as np
    from PIL import Image

    photo = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    src = Image.open(photo).convert("RGB")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        w, h = src.size
        cw, ch = int(rng.integers(200, w)), int(rng.integers(200, h))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = src.crop((x, y, x + cw, y + ch))
        scale = 256 / max(cw, ch)  # img2dataset resize_mode=border
        crop = crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.LANCZOS)
        canvas = Image.new("RGB", (256, 256))
        canvas.paste(crop, ((256 - crop.width) // 2, (256 - crop.height) // 2))
        if i % 2:
            canvas = canvas.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        canvas.save(buf, "JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def measure_decode(repeats: int = 3) -> tuple[float, float]:
    """(images/s on one CPU, mean JPEG KB) of prune.embed.decode.decode_image to a 224 crop."""
    from prune.embed.decode import PreprocessSpec, decode_image

    blobs = _sample_jpegs()
    spec = PreprocessSpec()
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        for b in blobs:
            decode_image(b, spec)
        best = max(best, len(blobs) / (time.perf_counter() - t))
    return best, sum(map(len, blobs)) / len(blobs) / 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", action="append", choices=sorted(DATASETS), help="default: both")
    ap.add_argument("--samples", type=int, help="a dataset of this many samples instead")
    ap.add_argument("--model", action="append", choices=sorted(capacity.MODELS), help="default: both")
    g = ap.add_argument_group("cluster (defaults: cluster/aws.yaml at max size)")
    g.add_argument("--gpu", choices=sorted(capacity.GPUS))
    for name, f in capacity.Cluster.__dataclass_fields__.items():  # every field: --num-gpus, --cpu-node-gbps, ...
        if name != "gpu":
            g.add_argument("--" + name.replace("_", "-"), type=type(f.default), help=f"default {f.default}")
    a = ap.add_argument_group("assumptions")
    a.add_argument("--efficiency", type=float, help="share of the GPU's bf16 peak reached")
    a.add_argument("--decode-images-per-cpu", type=float)
    a.add_argument("--bytes-per-sample", type=float)
    a.add_argument("--io-mb-per-cpu", type=float)
    a.add_argument("--faiss-gflops-per-cpu", type=float)
    a.add_argument("--kmeans-sample-fraction", type=float)
    a.add_argument("--kmeans-sample-size", type=int)
    a.add_argument("--k", type=int)
    a.add_argument("--kmeans-niter", type=int)
    a.add_argument("--kmeans-fit-cpus", type=int, help="kmeans.fit_num_cpus (0: fit in the driver)")
    a.add_argument("--kmeans-refine-iters", type=int)
    a.add_argument("--kmeans-device", choices=["cpu", "gpu"])
    a.add_argument("--assign-device", choices=["cpu", "gpu"])
    a.add_argument("--keep-fraction", type=float)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "laion.yaml"),
                    help="run config whose kmeans.sample_size/niter/fit_num_cpus/refine_iters/k and select.keep_fraction "
                         "are used (default configs/laion.yaml; '' for none)")
    ap.add_argument("--measure-decode", action="store_true", help="measure decode images/s per CPU here")
    ap.add_argument("--measure-flops", action="store_true", help="count GFLOPs/image with FlopCounterMode")
    ap.add_argument("--json", action="store_true", help="print the plans as JSON instead")
    args = ap.parse_args(argv)

    v = vars(args)
    cluster = capacity.with_overrides(capacity.Cluster(), **{f: v[f] for f in capacity.Cluster.__dataclass_fields__ if f in v})
    assume = capacity.Assumptions()
    if args.config:  # the run's own k-means and select settings, unless a flag says otherwise
        from pipelines.cli.config import load_config

        run = load_config(args.config, ["input=unused", "output=unused"])
        km = run.kmeans
        assume = capacity.with_overrides(
            assume, kmeans_niter=km.niter, kmeans_refine_iters=km.refine_iters, k=km.k,
            kmeans_sample_size=km.sample_size,
            keep_fraction=run.select.keep_fraction,
        )
        assume = capacity.replace(assume, kmeans_fit_cpus=km.fit_num_cpus)
    if args.kmeans_fit_cpus is not None:
        v["kmeans_fit_cpus"] = None
        assume = capacity.replace(assume, kmeans_fit_cpus=args.kmeans_fit_cpus or None)
    assume = capacity.with_overrides(assume, **{f: v[f] for f in capacity.Assumptions.__dataclass_fields__ if f in v})
    notes = []
    if args.measure_decode:
        rate, kb = measure_decode()
        assume = capacity.with_overrides(assume, decode_images_per_cpu=rate)
        notes.append(f"measured decode here: {rate:,.0f} images/s per CPU on 256 px JPEGs of {kb:.0f} KB")
    models = []
    for name in args.model or ["ViT-B-32", "ViT-L-14"]:
        m = capacity.MODELS[name]
        if args.measure_flops:
            m = capacity.with_overrides(m, gflops_per_image=round(measure_flops(name), 3), source="measured now")
        models.append(m)
    datasets = [(f"{args.samples:,} samples", args.samples)] if args.samples else [
        (d, DATASETS[d]) for d in (args.dataset or ["LAION-400M", "LAION-2B"])
    ]
    plans = [capacity.plan(d, n, m, cluster, assume) for d, n in datasets for m in models]
    if args.json:
        print(json.dumps([capacity.as_dict(p) for p in plans], indent=2, default=str))
        return 0
    print("## Per GPU type: embed rate and the decode CPUs that keep one GPU busy\n")
    print(gpu_table(assume))
    print("\n## Sizing\n")
    print(capacity.sizing_table(plans))
    print("\n## Hours and cost per stage\n")
    for p in plans:
        print(capacity.stages_table(p) + "\n")
    print("## Assumptions\n")
    print(capacity.assumptions_text(cluster, assume, models))
    for p in plans:
        if not p.sizing["k-means fit memory fits"]:
            notes.append(
                f"{p.dataset} {p.model.name}: the k-means fit needs {p.sizing['k-means fit memory'] / 1e9:,.0f} GB, "
                f"more than 80% of its node's {p.sizing['k-means fit node memory'] / 1e9:,.0f} GB: lower "
                f"--kmeans-sample-size or fit on a larger-memory node")
    for note in notes:
        print(f"- {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
