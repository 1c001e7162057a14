"""Capacity plan: hours and cost of a LAION-scale run, stage by stage, from stated rates.

Pure functions over small dataclasses, so every relationship is testable; the CLI that measures
and prints is `cluster/capacity_plan.py`. Nothing here was measured on a GPU: GPU rates are the
FLOPs a model needs per image against a GPU's dense bf16 peak, at the share of peak that our own
pipeline reached on CPU (`measured_efficiency`, from benchmarks/embed_throughput.py's results).
Every figure is an estimate; the assumptions are printed beside the table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace  # noqa: F401 (replace: used by the CLI)

from prune.cluster.kmeans import default_k
from prune.plan.measured import EMBED_RESULTS, MEASURED_EFFICIENCY, measured_efficiency  # noqa: F401 (re-exported)

GB = 1e9
TB = 1e12

def image_gflops(visual, size: int) -> float:
    """GFLOPs of one forward pass of an image tower on a size x size image (FlopCounterMode).

    Grad on: under no_grad/inference_mode nn.MultiheadAttention takes its fused fast path,
    whose q/k/v and output projections FlopCounterMode does not see (a third of ViT-B-32)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        visual(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9

@dataclass(frozen=True)
class ModelSpec:
    name: str
    gflops_per_image: float  # forward pass of the image tower, FLOPs (2 per multiply-add)
    embed_dim: int
    image_size: int
    source: str


# torch.utils.flop_counter.FlopCounterMode on a random-init open_clip image tower, 1 x 3 x 224 x 224,
# with grad enabled. Under no_grad nn.MultiheadAttention takes its fused fast path
# (torch._native_multi_head_attention), which FlopCounterMode does not count: that reads 5.89 and
# 103.8 GFLOPs, a third short (the q/k/v and output projections are missing). Recompute with
# `cluster/capacity_plan.py --measure-flops`.
MODELS = {
    "ViT-B-32": ModelSpec("ViT-B-32", 8.725, 512, 224, "FlopCounterMode, open_clip 3.3.0, grad on"),
    "ViT-L-14": ModelSpec("ViT-L-14", 155.53, 768, 224, "FlopCounterMode, open_clip 3.3.0, grad on"),
}


@dataclass(frozen=True)
class GpuSpec:
    name: str
    bf16_tflops: float  # dense tensor-core peak (no 2:4 sparsity)
    memory_gb: float
    source: str


GPUS = {
    "A10G": GpuSpec("A10G", 125.0, 24, "NVIDIA A10 datasheet, BF16 dense (A10G is AWS's A10 variant)"),
    "L4": GpuSpec("L4", 121.0, 24, "NVIDIA L4 datasheet, 242 with sparsity / 2"),
    "A100": GpuSpec("A100", 312.0, 40, "NVIDIA A100 datasheet, BF16 dense"),
    "H100": GpuSpec("H100", 989.0, 80, "NVIDIA H100 SXM datasheet, 1979 with sparsity / 2"),
}


@dataclass(frozen=True)
class Cluster:
    """What the user rents. Defaults: cluster/aws.yaml at max size, us-east-1 on-demand list prices (2024)."""

    gpu: str = "A10G"
    num_gpus: int = 32  # GPU worker nodes, one GPU each (g5.2xlarge)
    gpu_node_usd_per_hour: float = 1.212  # g5.2xlarge: 1 A10G, 8 vCPU, 32 GiB
    gpu_node_cpus: int = 8
    embed_actor_cpus: float = 2.0  # embed.num_cpus_per_actor; the rest of the node decodes
    cpu_nodes: int = 8  # CPU worker group: decode, assign, select, write
    cpu_node_cpus: int = 32  # c7i.8xlarge
    cpu_node_usd_per_hour: float = 1.428
    cpu_node_memory_gb: float = 64.0
    gpu_node_memory_gb: float = 32.0
    head_cpus: int = 16  # m7i.4xlarge: the driver (0 Ray CPUs: no task runs there)
    head_memory_gb: float = 64.0
    head_usd_per_hour: float = 0.8064
    gpu_node_gbps: float = 10.0  # network, Gbit/s ("up to" figures for g5.2xlarge)
    cpu_node_gbps: float = 12.5  # c7i.8xlarge

    @property
    def decode_cpus(self) -> float:
        """Ray CPUs free for decode tasks while embedding: the GPU nodes' leftovers and the CPU group."""
        return self.num_gpus * max(0.0, self.gpu_node_cpus - self.embed_actor_cpus) + self.cpu_group_cpus

    @property
    def cpu_group_cpus(self) -> int:
        return self.cpu_nodes * self.cpu_node_cpus


@dataclass(frozen=True)
class Assumptions:
    # share of peak the GPU reaches: what our pipeline reached on CPU (`measured_efficiency`)
    efficiency: float = field(default_factory=measured_efficiency)
    decode_images_per_cpu: float = 670.0  # measured: prune.embed.decode.decode_image, 256 px q95 JPEGs -> 224 crop
    bytes_per_sample: float = 40e3  # jpg + txt + json at img2dataset's 256 px resize (LAION: ~40-50 KB)
    io_mb_per_cpu: float = 80.0  # object-store stream per writer task (one S3 GET/PUT stream ~ 50-100 MB/s)
    faiss_gflops_per_cpu: float = 95.0  # measured: faiss Lloyd iteration, 1 thread, d=512, k=1024
    embedding_bytes_per_value: int = 2  # float16
    kmeans_sample_fraction: float = 0.01  # configs/laion.yaml: 4M of 400M; DataComp fits on 3-30%
    kmeans_sample_size: int | None = None  # overrides the fraction
    k: int | None = None  # None: the pipeline's default_k(n) = n / 10,000 clamped to [10, 100,000]
    kmeans_niter: int = 20
    kmeans_fit_cpus: int | None = 32  # kmeans.fit_num_cpus: the fit is a Ray task with this many CPUs; None: the driver
    kmeans_refine_iters: int = 5  # kmeans.refine_iters: distributed Lloyd passes over every embedding
    kmeans_device: str = "cpu"  # cpu: faiss-cpu (as built); gpu: the fit on one GPU at bf16 matmul rate
    assign_device: str = "cpu"  # cpu: faiss-cpu actors on the CPU group (as built); gpu: every GPU, bf16 matmul
    keep_fraction: float = 0.7


# ---------------------------------------------------------------- rates and sizes


def gpu_images_per_second(model: ModelSpec, gpu: GpuSpec, efficiency: float) -> float:
    """Images/s one GPU embeds: efficiency x dense bf16 peak / FLOPs per image (an estimate)."""
    return efficiency * gpu.bf16_tflops * 1e12 / (model.gflops_per_image * 1e9)


def decode_cpus_per_gpu(gpu_rate: float, decode_per_cpu: float) -> float:
    """CPUs of JPEG decode that keep one GPU busy."""
    return gpu_rate / decode_per_cpu


def embed_rate(
    gpu_rate: float, num_gpus: int, decode_cpus: float, decode_per_cpu: float, network_images_per_s: float = float("inf")
) -> tuple[float, str]:
    """Cluster images/s while embedding and what bounds it: the GPUs, the decode CPUs or the network."""
    return min((gpu_rate * num_gpus, "GPU"), (decode_cpus * decode_per_cpu, "decode"), (network_images_per_s, "network"))


def io_rate_bytes_per_s(cpus: float, mb_per_cpu: float, nodes: int, gbps_per_node: float) -> float:
    """Aggregate object-store throughput: one stream per CPU, capped by the nodes' network."""
    return min(cpus * mb_per_cpu * 1e6, nodes * gbps_per_node * 1e9 / 8)


def embedding_bytes(n: int, dim: int, bytes_per_value: int = 2) -> float:
    """Stored embeddings, values only: n x d x 2 bytes for float16 (keys and parquet overhead aside)."""
    return float(n) * dim * bytes_per_value


def kmeans_k(n: int, k: int | None = None) -> int:
    return k if k else default_k(n)


def kmeans_sample_size(n: int, fraction: float, size: int | None = None) -> int:
    return min(n, size if size else int(round(n * fraction)))


def kmeans_flops_per_iteration(sample: int, k: int, dim: int) -> float:
    """One Lloyd iteration is dominated by the sample x centroids inner products: 2 s k d FLOPs."""
    return 2.0 * sample * k * dim


def kmeans_memory_bytes(sample: int, k: int, dim: int, block: int = 1024) -> float:
    """Driver memory of the fit: the float32 sample and its normalized copy, centroids, a distance block."""
    return 2.0 * sample * dim * 4 + 2.0 * k * dim * 4 + float(block) * k * 4


def assign_flops(n: int, k: int, dim: int) -> float:
    """Assigning every sample to its nearest centroid: 2 n k d FLOPs (one distributed Lloyd step too)."""
    return 2.0 * n * k * dim


def writer_bytes(n: int, bytes_per_sample: float, keep_fraction: float) -> tuple[float, float]:
    """(bytes read, bytes written) by the write stage: every input tar once, the kept samples out."""
    read = n * bytes_per_sample
    return read, read * keep_fraction


# ---------------------------------------------------------------- the plan


@dataclass
class Stage:
    name: str
    runs_on: str
    work: str
    hours: float
    usd: float
    bound: str = ""


@dataclass
class Plan:
    dataset: str
    n: int
    model: ModelSpec
    cluster: Cluster
    assumptions: Assumptions
    sizing: dict = field(default_factory=dict)
    stages: list[Stage] = field(default_factory=list)

    @property
    def hours(self) -> float:
        return sum(s.hours for s in self.stages)

    @property
    def usd(self) -> float:
        return sum(s.usd for s in self.stages)


def _cpu_pool(c: Cluster) -> tuple[int, int, float, float, str]:
    """Where the CPU stages run: the CPU group, or the GPU nodes' CPUs when there is none.
    Returns (CPUs, nodes, Gbit/s per node, USD per hour of the pool, label)."""
    if c.cpu_nodes > 0:
        return c.cpu_group_cpus, c.cpu_nodes, c.cpu_node_gbps, c.cpu_nodes * c.cpu_node_usd_per_hour, f"{c.cpu_group_cpus} CPUs"
    cpus = c.num_gpus * c.gpu_node_cpus
    return cpus, c.num_gpus, c.gpu_node_gbps, c.num_gpus * c.gpu_node_usd_per_hour, f"{cpus} CPUs of the GPU nodes"


def _gpu_matmul_flops_per_s(gpu: GpuSpec, a: Assumptions) -> float:
    return a.efficiency * gpu.bf16_tflops * 1e12


def plan(dataset: str, n: int, model: ModelSpec, cluster: Cluster, a: Assumptions = Assumptions()) -> Plan:
    """Hours and cost of each stage. Each stage is billed for the nodes it keeps busy, plus the head
    for the whole run (the autoscaler releases idle workers between stages: `idle_timeout_minutes`)."""
    gpu = GPUS[cluster.gpu]
    c, p = cluster, Plan(dataset, n, model, cluster, a)
    head_h = c.head_usd_per_hour
    gpu_nodes_h = c.num_gpus * c.gpu_node_usd_per_hour
    cpu_nodes_h = c.cpu_nodes * c.cpu_node_usd_per_hour
    pool_cpus, pool_nodes, pool_gbps, pool_h, pool_label = _cpu_pool(c)

    # embed: read + decode on CPUs, model on GPUs; the slower side sets the pace
    per_gpu = gpu_images_per_second(model, gpu, a.efficiency)
    net = (c.num_gpus * c.gpu_node_gbps + c.cpu_nodes * c.cpu_node_gbps) * 1e9 / 8 / a.bytes_per_sample
    rate, bound = embed_rate(per_gpu, c.num_gpus, c.decode_cpus, a.decode_images_per_cpu, net)
    h = n / rate / 3600
    p.stages.append(Stage("embed", f"{c.num_gpus} x {gpu.name} + {c.cpu_nodes} CPU nodes",
                          f"{_fmt_flops(n * model.gflops_per_image * 1e9)}, {rate:,.0f} img/s",
                          h, h * (gpu_nodes_h + cpu_nodes_h + head_h), bound))

    # prototypes: k-means fit on a sample: a Ray task of kmeans.fit_num_cpus CPUs, the driver, or one GPU
    k = kmeans_k(n, a.k)
    s = kmeans_sample_size(n, a.kmeans_sample_fraction, a.kmeans_sample_size)
    fit = kmeans_flops_per_iteration(s, k, model.embed_dim) * a.kmeans_niter
    if a.kmeans_device == "gpu":
        fit_rate, where, usd_h = _gpu_matmul_flops_per_s(gpu, a), f"1 x {gpu.name}", c.gpu_node_usd_per_hour + head_h
        fit_memory_gb = c.gpu_node_memory_gb
    elif a.kmeans_fit_cpus is None:
        fit_rate, where, usd_h = c.head_cpus * a.faiss_gflops_per_cpu * 1e9, f"driver (head), {c.head_cpus} CPUs", head_h
        fit_memory_gb = c.head_memory_gb
    else:
        node_h, fit_memory_gb = ((c.cpu_node_usd_per_hour, c.cpu_node_memory_gb) if c.cpu_nodes
                                 else (c.gpu_node_usd_per_hour, c.gpu_node_memory_gb))
        fit_rate, where, usd_h = a.kmeans_fit_cpus * a.faiss_gflops_per_cpu * 1e9, f"1 task, {a.kmeans_fit_cpus} CPUs", node_h + head_h
    h = fit / fit_rate / 3600
    p.stages.append(Stage("k-means fit", where, f"s={s:,}, k={k:,}, {a.kmeans_niter} it, {_fmt_flops(fit)}",
                          h, h * usd_h))

    # refine: distributed Lloyd passes, each reads every embeddings file and does 2 n k d FLOPs
    af = assign_flops(n, k, model.embed_dim)
    io = io_rate_bytes_per_s(pool_cpus, a.io_mb_per_cpu, pool_nodes, pool_gbps)
    emb = embedding_bytes(n, model.embed_dim, a.embedding_bytes_per_value)
    per_pass = max(af / (pool_cpus * a.faiss_gflops_per_cpu * 1e9), emb / io)  # tasks overlap I/O and compute
    if a.kmeans_refine_iters:
        h = a.kmeans_refine_iters * per_pass / 3600
        p.stages.append(Stage("k-means refine", pool_label, f"{a.kmeans_refine_iters} passes x ({_fmt_flops(af)}, "
                              f"read {_fmt_bytes(emb)})", h, h * (pool_h + head_h)))

    # assign: every sample against every centroid
    if a.assign_device == "gpu":
        rate_f, where, usd_h = c.num_gpus * _gpu_matmul_flops_per_s(gpu, a), f"{c.num_gpus} x {gpu.name}", gpu_nodes_h + head_h
        read_rate = c.num_gpus * c.gpu_node_gbps * 1e9 / 8
    else:
        rate_f, where, usd_h = pool_cpus * a.faiss_gflops_per_cpu * 1e9, pool_label, pool_h + head_h
        read_rate = io
    h = max(af / rate_f, emb / read_rate) / 3600  # reads every embeddings file once
    p.stages.append(Stage("assign", where, f"{_fmt_flops(af)}, read {_fmt_bytes(emb)}", h, h * usd_h))

    # select: reads the scores twice (histograms, then the cut bins): small beside the rest
    score_bytes = n * 40.0
    h = 2 * score_bytes / io / 3600
    p.stages.append(Stage("select", pool_label, f"{2 * score_bytes / GB:,.0f} GB read", h, h * (pool_h + head_h)))

    # write: stream every input tar once, write the kept bytes
    rd, wr = writer_bytes(n, a.bytes_per_sample, a.keep_fraction)
    h = (rd + wr) / io / 3600
    p.stages.append(Stage("write", pool_label, f"read {rd / TB:,.1f} TB, write {wr / TB:,.1f} TB",
                          h, h * (pool_h + head_h), "network" if io < pool_cpus * a.io_mb_per_cpu * 1e6 else "streams"))

    p.sizing = {
        "images/s per GPU (estimate)": per_gpu,
        "decode CPUs per GPU": decode_cpus_per_gpu(per_gpu, a.decode_images_per_cpu),
        "embed bound by": bound,
        "embeddings (float16)": emb,
        "input bytes": rd,
        "k": k,
        "k-means sample": s,
        "k-means fit memory": kmeans_memory_bytes(s, k, model.embed_dim),
        "k-means FLOPs per iteration": kmeans_flops_per_iteration(s, k, model.embed_dim),
        "distributed Lloyd iteration, hours": per_pass / 3600,
        "k-means fit memory fits": kmeans_memory_bytes(s, k, model.embed_dim) <= 0.8 * fit_memory_gb * GB,
        "k-means fit node memory": fit_memory_gb * GB,
    }
    return p


# ---------------------------------------------------------------- printing


def _fmt_bytes(b: float) -> str:
    for unit, size in (("TB", TB), ("GB", GB), ("MB", 1e6)):
        if b >= size:
            return f"{b / size:,.1f} {unit}"
    return f"{b:,.0f} B"


def _fmt_hours(h: float) -> str:
    return f"{h:,.2f}" if h < 1 else f"{h:,.1f}"


def _fmt_flops(f: float) -> str:
    for unit, size in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12)):
        if f >= size:
            return f"{f / size:,.1f} {unit}"
    return f"{f / 1e9:,.1f} GFLOP"


def sizing_table(plans: list[Plan]) -> str:
    head = "| | " + " | ".join(f"{p.dataset} {p.model.name}" for p in plans) + " |"
    rows = [head, "| --- |" + " ---: |" * len(plans)]

    def row(label, fn):
        rows.append(f"| {label} | " + " | ".join(fn(p) for p in plans) + " |")

    row("images/s per GPU (estimate)", lambda p: f"{p.sizing['images/s per GPU (estimate)']:,.0f}")
    row("decode CPUs per GPU", lambda p: f"{p.sizing['decode CPUs per GPU']:.1f}")
    row("embed stage bound by", lambda p: p.sizing["embed bound by"])
    row("embeddings stored (float16)", lambda p: _fmt_bytes(p.sizing["embeddings (float16)"]))
    row("k (n / 10,000)", lambda p: f"{p.sizing['k']:,}")
    row("k-means sample", lambda p: f"{p.sizing['k-means sample']:,}")
    row("k-means fit memory", lambda p: _fmt_bytes(p.sizing["k-means fit memory"]))
    row("k-means FLOPs per iteration", lambda p: _fmt_flops(p.sizing["k-means FLOPs per iteration"]))
    row("one distributed Lloyd iteration (CPU group), h",
        lambda p: f"{p.sizing['distributed Lloyd iteration, hours']:,.1f}")
    row("writer I/O (read + write)", lambda p: _fmt_bytes(p.sizing["input bytes"] * (1 + p.assumptions.keep_fraction)))
    return "\n".join(rows)


def stages_table(p: Plan) -> str:
    rows = [f"**{p.dataset}, {p.model.name}** ({p.n:,} samples)", "",
            "| stage | runs on | work | hours | cost (USD) |", "| --- | --- | --- | ---: | ---: |"]
    for s in p.stages:
        rows.append(f"| {s.name} | {s.runs_on} | {s.work}{f' ({s.bound}-bound)' if s.bound else ''} | "
                    f"{_fmt_hours(s.hours)} | {s.usd:,.0f} |")
    rows.append(f"| **total** | | | **{p.hours:,.1f}** | **{p.usd:,.0f}** |")
    return "\n".join(rows)


def assumptions_text(cluster: Cluster, a: Assumptions, models: list[ModelSpec]) -> str:
    gpu = GPUS[cluster.gpu]
    lines = [
        f"- cluster: {cluster.num_gpus} GPU nodes ({gpu.name}, {cluster.gpu_node_cpus} CPUs, "
        f"${cluster.gpu_node_usd_per_hour}/h each), {cluster.cpu_nodes} CPU nodes ({cluster.cpu_node_cpus} CPUs, "
        f"${cluster.cpu_node_usd_per_hour}/h), head {cluster.head_cpus} CPUs ${cluster.head_usd_per_hour}/h",
        f"- GPU peak: {gpu.bf16_tflops} TFLOP/s bf16 dense ({gpu.source}); achieved share of peak "
        f"{a.efficiency:.1%}, the share our CPU pipeline reached (an assumption, not a GPU measurement)",
    ]
    for m in models:
        lines.append(f"- {m.name}: {m.gflops_per_image} GFLOPs/image ({m.source}), {m.embed_dim}-d")
    lines += [
        f"- decode: {a.decode_images_per_cpu:,.0f} images/s per CPU (256 px JPEG -> 224 crop); "
        f"{a.bytes_per_sample / 1e3:,.0f} KB per sample; {a.io_mb_per_cpu:,.0f} MB/s object-store stream per CPU, "
        f"capped by the nodes' network ({cluster.gpu_node_gbps} / {cluster.cpu_node_gbps} Gbit/s per GPU / CPU node)",
        f"- k-means: faiss {a.faiss_gflops_per_cpu:,.0f} GFLOP/s per CPU; sample "
        f"{a.kmeans_sample_size or f'{a.kmeans_sample_fraction:.0%} of n'}; {a.kmeans_niter} iterations; "
        f"fit on {a.kmeans_device} ({'the driver' if a.kmeans_fit_cpus is None else f'a task of {a.kmeans_fit_cpus} CPUs'}), "
        f"{a.kmeans_refine_iters} refinement passes, assign on {a.assign_device}; keep fraction {a.keep_fraction}",
    ]
    return "\n".join(lines)


def with_overrides(obj, **kw):
    """A copy of a Cluster/Assumptions with the given fields replaced (None values ignored)."""
    return replace(obj, **{k: v for k, v in kw.items() if v is not None})


def as_dict(p: Plan) -> dict:
    return {"dataset": p.dataset, "n": p.n, "model": asdict(p.model), "cluster": asdict(p.cluster),
            "assumptions": asdict(p.assumptions), "sizing": p.sizing,
            "stages": [asdict(s) for s in p.stages], "hours": p.hours, "usd": p.usd}
