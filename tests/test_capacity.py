"""The capacity plan's formulas: relationships between inputs and outputs, not fixed numbers."""

import importlib.util
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from prune.cluster.kmeans import default_k
from prune.plan import capacity
from prune.plan.capacity import GPUS, MODELS, Assumptions, Cluster

from .conftest import REPO

ROOT = Path(REPO)
B32, L14 = MODELS["ViT-B-32"], MODELS["ViT-L-14"]


def _plan(n=400_000_000, model=B32, cluster=Cluster(), a=Assumptions()):
    return capacity.plan("test", n, model, cluster, a)


def _stage(p, name):
    return next(s for s in p.stages if s.name == name)


def test_gpu_rate_is_efficiency_times_peak_over_flops():
    a10g, h100 = GPUS["A10G"], GPUS["H100"]
    r = capacity.gpu_images_per_second(B32, a10g, 0.4)
    assert r * B32.gflops_per_image * 1e9 == pytest.approx(0.4 * a10g.bf16_tflops * 1e12)
    assert capacity.gpu_images_per_second(B32, a10g, 0.8) == pytest.approx(2 * r)
    # the bigger model is slower by exactly its FLOPs ratio; a faster GPU by its peak ratio
    assert r / capacity.gpu_images_per_second(L14, a10g, 0.4) == pytest.approx(L14.gflops_per_image / B32.gflops_per_image)
    assert capacity.gpu_images_per_second(B32, h100, 0.4) / r == pytest.approx(h100.bf16_tflops / a10g.bf16_tflops)


EMBED_RESULTS = ROOT / "benchmarks" / "results" / "embed_throughput.json"


def test_default_efficiency_is_the_benchmarks_measured_share():
    """The plan's efficiency is the figure benchmarks/embed_throughput.py wrote: the pipeline's
    images/s end to end x GFLOPs per image over the matmul rate measured in the same run."""
    measured = json.loads(EMBED_RESULTS.read_text())
    assert capacity.EMBED_RESULTS == EMBED_RESULTS
    assert Assumptions().efficiency == measured["efficiency"]
    rate = measured["images_per_s"] * measured["gflops_per_image"] / measured["matmul_gflops"][measured["precision"]]
    assert measured["efficiency"] == pytest.approx(rate, rel=5e-3)


def test_an_installed_package_falls_back_to_the_same_figure(tmp_path):
    """Installed without the benchmarks directory, the plan uses the constant copied from the
    results file: the two must not drift apart."""
    assert capacity.MEASURED_EFFICIENCY == json.loads(EMBED_RESULTS.read_text())["efficiency"]
    assert capacity.measured_efficiency(tmp_path / "no_benchmarks.json") == capacity.MEASURED_EFFICIENCY


def test_decode_cpus_per_gpu_is_gpu_rate_over_decode_rate():
    assert capacity.decode_cpus_per_gpu(5000.0, 500.0) == pytest.approx(10.0)
    p = _plan()
    a = p.assumptions
    assert p.sizing["decode CPUs per GPU"] == pytest.approx(p.sizing["images/s per GPU (estimate)"] / a.decode_images_per_cpu)
    # ViT-L-14 needs fewer decode CPUs per GPU than ViT-B-32, by the FLOPs ratio
    ratio = p.sizing["decode CPUs per GPU"] / _plan(model=L14).sizing["decode CPUs per GPU"]
    assert ratio == pytest.approx(L14.gflops_per_image / B32.gflops_per_image)


def test_embed_rate_takes_the_slowest_side():
    assert capacity.embed_rate(1000, 4, 100, 10) == (1000.0, "decode")  # 4000 GPU vs 1000 decode
    assert capacity.embed_rate(1000, 4, 1000, 10) == (4000, "GPU")
    assert capacity.embed_rate(1000, 4, 1000, 10, 500.0) == (500.0, "network")
    starved = _plan(cluster=replace(Cluster(), cpu_nodes=0, gpu_node_cpus=3))
    assert starved.sizing["embed bound by"] == "decode"
    assert _stage(starved, "embed").hours > _stage(_plan(), "embed").hours


def test_storage_is_n_times_dim_times_two_bytes():
    assert capacity.embedding_bytes(1000, 512) == 1000 * 512 * 2
    assert capacity.embedding_bytes(1000, 768, 4) == 1000 * 768 * 4
    for model in (B32, L14):
        p = _plan(n=2_320_000_000, model=model)
        assert p.sizing["embeddings (float16)"] == 2_320_000_000 * model.embed_dim * 2


def test_kmeans_sizes_follow_the_pipeline():
    n = 400_000_000
    p = _plan(n=n)
    assert p.sizing["k"] == default_k(n)  # the pipeline's own default, n / 10,000 clamped
    assert p.sizing["k-means sample"] == round(n * Assumptions().kmeans_sample_fraction)
    s, k, d = p.sizing["k-means sample"], p.sizing["k"], B32.embed_dim
    assert p.sizing["k-means FLOPs per iteration"] == 2 * s * k * d
    assert capacity.kmeans_sample_size(100, 0.5) == 50
    assert capacity.kmeans_sample_size(100, 0.5, size=1000) == 100  # never more than the data
    assert capacity.kmeans_k(123_456_789, k=7) == 7
    # memory: the float32 sample dominates and grows linearly with it
    m1, m2 = capacity.kmeans_memory_bytes(10**6, 1000, 512), capacity.kmeans_memory_bytes(2 * 10**6, 1000, 512)
    assert m2 - m1 == pytest.approx(2 * 10**6 * 512 * 4)


def test_kmeans_time_scales_with_iterations_and_fit_cpus():
    base = _stage(_plan(), "k-means fit").hours
    assert _stage(_plan(a=replace(Assumptions(), kmeans_niter=40)), "k-means fit").hours == pytest.approx(2 * base)
    fit_cpus = Assumptions().kmeans_fit_cpus
    assert _stage(_plan(a=replace(Assumptions(), kmeans_fit_cpus=2 * fit_cpus)), "k-means fit").hours == pytest.approx(base / 2)
    # fitted in the driver (kmeans.fit_num_cpus unset): the head's cores set the pace
    on_head = replace(Assumptions(), kmeans_fit_cpus=None)
    h64 = _stage(_plan(cluster=replace(Cluster(), head_cpus=64), a=on_head), "k-means fit")
    h128 = _stage(_plan(cluster=replace(Cluster(), head_cpus=128), a=on_head), "k-means fit")
    assert h128.hours == pytest.approx(h64.hours / 2) and "driver" in h64.runs_on
    gpu = _stage(_plan(a=replace(Assumptions(), kmeans_device="gpu")), "k-means fit")
    assert gpu.hours < base and "A10G" in gpu.runs_on


def test_refinement_passes_cost_one_assignment_each():
    p = _plan()
    refine, assign = _stage(p, "k-means refine"), _stage(p, "assign")
    passes = Assumptions().kmeans_refine_iters
    assert refine.hours >= passes * assign.hours * (1 - 1e-9)  # each pass: 2 n k d, plus re-reading embeddings
    assert _stage(_plan(a=replace(Assumptions(), kmeans_refine_iters=2 * passes)), "k-means refine").hours == pytest.approx(2 * refine.hours)
    assert all(s.name != "k-means refine" for s in _plan(a=replace(Assumptions(), kmeans_refine_iters=0)).stages)


def test_fit_memory_is_checked_against_the_node_that_fits():
    small, big = _plan(n=400_000_000), _plan(n=2_320_000_000, model=L14)
    assert small.sizing["k-means fit memory fits"] and not big.sizing["k-means fit memory fits"]
    roomy = _plan(n=2_320_000_000, model=L14, cluster=replace(Cluster(), cpu_node_memory_gb=512))
    assert roomy.sizing["k-means fit memory fits"]


def test_stage_hours_are_linear_in_dataset_size():
    a = _plan(n=400_000_000, a=replace(Assumptions(), k=40_000))
    b = _plan(n=800_000_000, a=replace(Assumptions(), k=40_000))
    for name in ("embed", "k-means refine", "assign", "select", "write"):
        assert _stage(b, name).hours == pytest.approx(2 * _stage(a, name).hours)
        assert _stage(b, name).usd == pytest.approx(2 * _stage(a, name).usd)
    # with k growing as n / 10,000 too, the fit (sample x k) grows quadratically
    q1, q2 = _plan(n=200_000_000), _plan(n=400_000_000)
    assert _stage(q2, "k-means fit").hours == pytest.approx(4 * _stage(q1, "k-means fit").hours, rel=1e-3)


def test_more_gpus_fewer_hours():
    few, many = _plan(model=L14, cluster=replace(Cluster(), num_gpus=16)), _plan(model=L14, cluster=replace(Cluster(), num_gpus=64))
    assert _stage(many, "embed").hours == pytest.approx(_stage(few, "embed").hours / 4)
    assert many.hours < few.hours


def test_cost_is_hours_times_price():
    c = Cluster()
    p = _plan(cluster=c)
    e = _stage(p, "embed")
    per_hour = c.num_gpus * c.gpu_node_usd_per_hour + c.cpu_nodes * c.cpu_node_usd_per_hour + c.head_usd_per_hour
    assert e.usd == pytest.approx(e.hours * per_hour)
    dearer = _plan(cluster=replace(c, gpu_node_usd_per_hour=2 * c.gpu_node_usd_per_hour))
    assert _stage(dearer, "embed").usd > e.usd and _stage(dearer, "write").usd == pytest.approx(_stage(p, "write").usd)
    assert p.usd == pytest.approx(sum(s.usd for s in p.stages))
    assert p.hours == pytest.approx(sum(s.hours for s in p.stages))


def test_writer_io_reads_everything_once_and_writes_the_kept_share():
    rd, wr = capacity.writer_bytes(1000, 40e3, 0.7)
    assert rd == 1000 * 40e3 and wr == pytest.approx(0.7 * rd)
    io = capacity.io_rate_bytes_per_s(256, 80, 8, 12.5)
    assert io == min(256 * 80e6, 8 * 12.5e9 / 8)
    p = _plan()
    w = _stage(p, "write")
    assert w.hours * 3600 * io == pytest.approx(rd / 1000 * 400_000_000 * 1.7)
    assert _stage(_plan(a=replace(Assumptions(), keep_fraction=0.3)), "write").hours < w.hours


def test_assign_on_gpus_uses_every_gpu():
    cpu = _stage(_plan(), "assign")
    g16 = _stage(_plan(cluster=replace(Cluster(), num_gpus=16), a=replace(Assumptions(), assign_device="gpu")), "assign")
    g32 = _stage(_plan(a=replace(Assumptions(), assign_device="gpu")), "assign")
    assert g32.hours == pytest.approx(g16.hours / 2)
    assert cpu.runs_on.endswith("CPUs") and "A10G" in g32.runs_on


def test_model_flops_table_matches_flop_counter():
    """The GFLOPs in MODELS are what FlopCounterMode counts with grad on (ViT-B-32: a second or two)."""
    spec = importlib.util.spec_from_file_location("capacity_plan", ROOT / "cluster" / "capacity_plan.py")
    capacity_plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(capacity_plan)
    assert capacity_plan.measure_flops("ViT-B-32") == pytest.approx(B32.gflops_per_image, rel=1e-3)


def test_cli_prints_a_markdown_table_for_every_combination():
    out = subprocess.run(
        [sys.executable, str(ROOT / "cluster" / "capacity_plan.py"), "--num-gpus", "8"],
        capture_output=True, text=True, check=True,
    ).stdout
    for d in ("LAION-400M", "LAION-2B"):
        for m in ("ViT-B-32", "ViT-L-14"):
            assert f"**{d}, {m}**" in out
    assert out.count("| **total** |") == 4
    assert "8 x A10G" in out
    totals = [float(line.split("|")[4].strip(" *").replace(",", "")) for line in out.splitlines() if line.startswith("| **total**")]
    assert all(math.isfinite(t) and t > 0 for t in totals)


def test_gpu_table_rows_follow_the_rates_it_states():
    """Per GPU type: a bigger peak embeds more, a bigger model fewer, and the decode CPUs per GPU
    are the rate over one CPU's decode rate (the CPU:GPU ratio the cluster needs)."""
    from prune.plan.capacity import GPUS, MODELS, Assumptions
    from prune.plan.gpus import gpu_table

    a = Assumptions()
    rows = [r.split("|")[1:-1] for r in gpu_table(a).splitlines()[2:]]
    assert [r[0].split(" (")[0].strip() for r in rows] == list(GPUS)
    for r in rows:
        b32, b32_cpus, l14, l14_cpus = (float(c.replace(",", "")) for c in r[1:])
        assert b32 > l14 and b32_cpus > l14_cpus
        assert abs(b32 / a.decode_images_per_cpu - b32_cpus) < 0.06
    peaks = [g.bf16_tflops for g in GPUS.values()]
    rates = [float(r[1].replace(",", "")) for r in rows]
    assert sorted(range(len(peaks)), key=peaks.__getitem__) == sorted(range(len(rates)), key=rates.__getitem__)
    assert MODELS["ViT-L-14"].gflops_per_image > MODELS["ViT-B-32"].gflops_per_image
