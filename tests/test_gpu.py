"""On a real NVIDIA GPU: the embed stage's actors on the GPU, bf16, fp32/bf16 agreement, one actor per GPU.

Marked `gpu` (`pytest -m gpu`; benchmarks/gpu_check.sh runs them) and skipped wherever torch sees no
CUDA device, so the normal suite passes on machines without one. The images are synthetic web
photos (prune/demo/photos.py: a bare GPU machine has no Fashion-MNIST); the weights are random-init
(nothing is downloaded). The pipeline tests start a Ray of their own that holds the real GPUs
(the session's Ray advertises one fake GPU on 2 CPUs).
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

from pipelines.executor import stage_fingerprint
from pipelines.inputs import resolve_shards
from pipelines.stage import Context
from pipelines.stages.embed import EmbedStage
from prune import schema
from prune.demo.photos import write_photo_shards
from prune.embed.backends import BACKENDS, make_embedder, preprocess_spec_for
from prune.embed.backends.open_clip_backend import OpenClipEmbedder
from prune.embed.decode import decode_batch
from prune.embed.settings import DecodeConfig, EmbedConfig
from prune.io.shards import read_shard
from prune.io.storage import OutputDir

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU that torch can use"),
]

MODEL = "ViT-B-32"
SHARDS, PER_SHARD = 3, 100
PROBES = "ssl_prune_gpu_probes"  # the named actor the probe embedders report to
EXTS = ["jpg"]


def cfg(**kw) -> EmbedConfig:
    return EmbedConfig(model=MODEL, allow_random_init=True, **kw)


def native_bf16() -> bool:
    return torch.cuda.is_bf16_supported(including_emulation=False)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    tars = write_photo_shards(str(d), count=SHARDS * PER_SHARD, shard_size=PER_SHARD, seed=3)
    return {"dir": d, "tars": tars}


def crops_of(tar: str, n: int | None = None) -> tuple[list[str], np.ndarray]:
    """Keys and the model's uint8 crops (as the decode tasks make them) of a tar's first n photos."""
    samples = read_shard(tar, EXTS).samples[:n]
    pixels, status = decode_batch([s.member(EXTS)[1] for s in samples], [s.status for s in samples],
                                  preprocess_spec_for(cfg()), True, 89_478_485)
    assert set(status) == {schema.STATUS_OK}
    return [s.key for s in samples], pixels


@pytest.fixture(scope="module")
def crops(photos) -> np.ndarray:
    return crops_of(photos["tars"][0], 64)[1]


# --- in this process ---------------------------------------------------------------------------


def test_the_embedder_runs_bf16_on_the_gpu(crops):
    emb = make_embedder(cfg(), "cuda")
    assert emb.device == "cuda"
    assert emb.precision == ("bf16" if native_bf16() else "fp32")  # H100, A100, A10G, L4: bf16
    param = next(emb.visual.parameters())
    assert param.is_cuda and param.dtype == (torch.bfloat16 if native_bf16() else torch.float32)
    vecs = emb.embed(crops)
    assert vecs.shape == (len(crops), emb.dim) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-3)
    assert np.abs(vecs[0] - vecs[1]).max() > 0
    big = emb.embed(np.concatenate([crops] * 8))  # configs/laion.yaml's batch, 512
    assert big.shape == (8 * len(crops), emb.dim) and np.isfinite(big).all()


def test_bf16_agrees_with_fp32_on_the_gpu(crops):
    fp32 = make_embedder(cfg(precision="fp32"), "cuda")
    bf16 = make_embedder(cfg(precision="bf16"), "cuda")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    cos = (fp32.embed(crops) * bf16.embed(crops)).sum(axis=1)
    assert cos.min() >= 0.99, cos.min()


def test_the_gpu_agrees_with_the_cpu_in_fp32(crops):
    cpu = make_embedder(cfg(precision="fp32"), "cpu")
    gpu = make_embedder(cfg(precision="fp32"), "cuda")
    cos = (cpu.embed(crops) * gpu.embed(crops)).sum(axis=1)  # same seed: the same weights
    assert cos.min() >= 0.995, cos.min()  # cuDNN's TF32 convolution is the difference


# --- through the pipeline, on a Ray that holds the real GPUs ---------------------------------------


class ProbeEmbedder(OpenClipEmbedder):
    """open_clip's embedder, reporting where its model landed to the `PROBES` actor, once per actor."""

    name = "gpu_probe"

    def __init__(self, cfg: EmbedConfig, device: str | None = None):
        super().__init__(cfg, device)
        param = next(self.visual.parameters())
        props = torch.cuda.get_device_properties(param.device) if param.is_cuda else None
        ray.get(ray.get_actor(PROBES).add.remote({
            "pid": os.getpid(), "device": self.device, "precision": self.precision,
            "param_device": str(param.device), "param_dtype": str(param.dtype),
            "ray_gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device_count": torch.cuda.device_count(),
            "gpu": str(getattr(props, "uuid", None) or getattr(props, "name", None)),
        }))


@ray.remote(num_cpus=0)
class Probes:
    def __init__(self):
        self.seen = []

    def add(self, record: dict) -> None:
        self.seen.append(record)

    def records(self) -> list[dict]:
        return self.seen


@pytest.fixture(scope="module")
def gpu_ray(own_ray_module):
    """A local Ray with every GPU torch sees; -> how many."""
    gpus = torch.cuda.device_count()
    ray.init(num_cpus=max(2, min(8, os.cpu_count() or 2)), num_gpus=gpus, include_dashboard=False,
             configure_logging=False)
    BACKENDS.register(ProbeEmbedder)
    yield gpus
    BACKENDS.unregister(ProbeEmbedder.name)


@pytest.fixture
def probes(gpu_ray):
    actor = Probes.options(name=PROBES).remote()
    yield actor
    ray.kill(actor)


def run_embed(shards_dir, out, **embed):
    stage = EmbedStage(embed=cfg(backend=ProbeEmbedder.name, **embed), decode=DecodeConfig(batch_size=64))
    stage.setup()
    ctx = Context(OutputDir(str(out)), resolve_shards(str(shards_dir)))
    ctx.fingerprint = stage_fingerprint(stage, "", ctx)
    return stage.run(ctx)


def read_embeddings(out) -> pa.Table:
    d = os.path.join(out, schema.EMBEDDINGS_DIR)
    return pa.concat_tables(pq.read_table(os.path.join(d, name)) for name in sorted(os.listdir(d)))


def test_the_embed_stage_embeds_on_the_gpu(gpu_ray, probes, photos, tmp_path):
    stats = run_embed(photos["dir"], tmp_path / "out", batch_size=128, device="cuda")
    assert stats.shards_embedded == SHARDS
    assert stats.actor_resources["num_gpus"] == 1 and stats.actor_resources["actors"] == 1
    precision = "bf16" if native_bf16() else "fp32"
    assert stats.actors_ran == {f"cuda/{precision}/{torch.cuda.get_device_name(0)}": 1}  # what the manifest says
    (rec,) = ray.get(probes.records.remote())  # one actor, its model loaded once
    assert rec["device"] == "cuda" and rec["param_device"].startswith("cuda")
    assert rec["precision"] == ("bf16" if native_bf16() else "fp32")
    assert rec["param_dtype"] == ("torch.bfloat16" if native_bf16() else "torch.float32")
    assert len(rec["ray_gpu_ids"]) == 1 and rec["device_count"] == 1  # Ray gave it one GPU, and it sees only that

    table = read_embeddings(tmp_path / "out")
    assert table.num_rows == SHARDS * PER_SHARD
    assert set(table.column(schema.STATUS).to_pylist()) == {schema.STATUS_OK}
    col = table.column(schema.EMBEDDING).combine_chunks()
    stored = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=5e-3)  # float16 on disk

    # the first shard's vectors match the CPU's fp32 ones for the same crops
    keys, pixels = crops_of(photos["tars"][0])
    ref = make_embedder(cfg(precision="fp32"), "cpu").embed(pixels)
    row = {k: i for i, k in enumerate(table.column(schema.KEY).to_pylist())}
    cos = (stored[[row[k] for k in keys]] * ref).sum(axis=1)
    assert cos.min() >= 0.99, cos.min()


def test_one_embed_actor_per_gpu(gpu_ray, probes, photos, tmp_path):
    """Asked for one actor more than there are GPUs, the stage starts one per GPU, each on its own."""
    gpus = gpu_ray
    stats = run_embed(photos["dir"], tmp_path / "out", batch_size=64, concurrency=gpus + 1)
    assert stats.actor_resources["actors"] == gpus and stats.actor_resources["num_gpus"] == 1
    seen = ray.get(probes.records.remote())
    assert len({r["pid"] for r in seen}) == gpus
    assert all(r["device"] == "cuda" and len(r["ray_gpu_ids"]) == 1 and r["device_count"] == 1 for r in seen)
    assert len({r["ray_gpu_ids"][0] for r in seen}) == gpus  # a different GPU each
    assert len({r["gpu"] for r in seen}) == gpus
    assert read_embeddings(tmp_path / "out").num_rows == SHARDS * PER_SHARD


@ray.remote(num_gpus=1, num_cpus=0)
class GpuHolder:
    def where(self) -> tuple[list[str], str | None]:
        return [str(g) for g in ray.get_gpu_ids()], os.environ.get("CUDA_VISIBLE_DEVICES")


def test_an_actor_beyond_the_gpus_is_not_placed(gpu_ray):
    """Ray's side of the promise: actors asking num_gpus=1 get a GPU each, and one more waits."""
    gpus = gpu_ray
    holders = [GpuHolder.remote() for _ in range(gpus + 1)]
    try:
        calls = [h.where.remote() for h in holders]
        ready, pending = ray.wait(calls, num_returns=gpus, timeout=120)
        assert len(ready) == gpus
        ids = [ray.get(r)[0] for r in ready]
        assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == gpus
        late, _ = ray.wait(pending, num_returns=1, timeout=3)
        assert not late  # no GPU left for it
    finally:
        for h in holders:
            ray.kill(h)
