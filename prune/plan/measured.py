"""The share of a GPU's peak the capacity plan assumes: what our embed pipeline measured on CPU.

Kept apart from the plan's formulas: it is a measurement, re-read from the benchmark's results.
"""

from __future__ import annotations

import json
from pathlib import Path

# What `benchmarks/embed_throughput.py --json` wrote: the embed pipeline's images/s end to end (model
# load included) x FLOPs per image over the machine's measured bf16 matmul rate. Re-measure, and the plan follows.
EMBED_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "embed_throughput.json"
# measured on 2026-11-26, benchmarks/results/embed_throughput.json (10,000 images: 62.6 img/s x 8.725
# GFLOPs / 858 GFLOP/s): for a package installed without the benchmarks (tests keep the two equal)
MEASURED_EFFICIENCY = 0.6366


def measured_efficiency(results: Path = EMBED_RESULTS) -> float:
    """The share of peak the plan assumes a GPU reaches: what our pipeline reached on CPU, read from
    the benchmark's results in a checkout, else the copy above."""
    try:
        return float(json.loads(results.read_text())["efficiency"])
    except FileNotFoundError:
        return MEASURED_EFFICIENCY
