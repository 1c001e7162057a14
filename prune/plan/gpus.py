"""The GPU plan's table: per GPU type and model, the embed rate and the decode CPUs per GPU."""

from __future__ import annotations

from prune.plan.capacity import GPUS, MODELS, Assumptions, decode_cpus_per_gpu, gpu_images_per_second


def gpu_table(assume: Assumptions, models=MODELS, gpus=GPUS) -> str:
    """Per GPU type and model: images/s one GPU embeds (the estimate) and the decode CPUs that keep
    it busy, which is the CPU:GPU ratio a cluster needs for the embed stage to be GPU-bound."""
    rows = ["| GPU (dense bf16 TFLOP/s) | " + " | ".join(f"{m} img/s | {m} decode CPUs" for m in models) + " |",
            "| --- |" + " ---: | ---: |" * len(models)]
    for gpu in gpus.values():
        cells = []
        for model in models.values():
            rate = gpu_images_per_second(model, gpu, assume.efficiency)
            cells += [f"{rate:,.0f}", f"{decode_cpus_per_gpu(rate, assume.decode_images_per_cpu):.1f}"]
        rows.append(f"| {gpu.name} ({gpu.bf16_tflops:g}) | " + " | ".join(cells) + " |")
    return "\n".join(rows)
