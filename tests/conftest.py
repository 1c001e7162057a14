"""Shared fixtures: real Fashion-MNIST shards (good and bad), one local Ray, one pipeline run.

The Ray instance advertises one fake GPU, so every pipeline run in the tests exercises the
GPU scheduling path (embed actors ask for `num_gpus=1`); torch sees no CUDA, so they run on
the CPU. The CPU-only path is exercised by the CLI test, which starts its own Ray.
"""

from __future__ import annotations

import shutil

import pytest
import ray

from prune.config import validate_config
from prune.demo_shards import write_demo_shards, write_bad_shards

GOOD_SHARDS = 4
PER_SHARD = 60


def small_config(input_dir, output_dir, **overrides) -> dict:
    cfg = {
        "input": str(input_dir),
        "output": str(output_dir),
        "decode": {"batch_size": 32},
        "embed": {
            "model": "ViT-S-32",
            "allow_random_init": True,
            "batch_size": 32,
            "torch_threads": 2,
            "shards_per_round": 4,
        },
        "kmeans": {"k": 4, "niter": 10, "assign_concurrency": 1},
        "select": {"keep_fraction": 0.6, "policy": "hard", "balanced": True},
        "write": {"samples_per_shard": 25, "band_step": 0.2},
    }
    for dotted, value in overrides.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


@pytest.fixture(scope="session")
def ray_cluster():
    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory):
    """4 good demo shards (240 real images) and the three bad fixtures after them."""
    root = tmp_path_factory.mktemp("data")
    d = root / "shards"
    paths = write_demo_shards(str(d), count=GOOD_SHARDS * PER_SHARD, shard_size=PER_SHARD, seed=1)
    bad = write_bad_shards(str(d), paths[0])
    return {"dir": d, "root": root, "good": paths, "bad": bad}


@pytest.fixture(scope="session")
def pipeline_run(ray_cluster, shards_dir, tmp_path_factory):
    """One complete run over good and bad shards; tests that change outputs work on a copy."""
    from pipelines.run import run

    out = tmp_path_factory.mktemp("run") / "out"
    cfg = validate_config(small_config(shards_dir["dir"], out))
    manifest = run(cfg)
    return {"cfg": cfg, "manifest": manifest, "out": out}


@pytest.fixture
def run_copy(pipeline_run, tmp_path):
    """A private copy of the shared run's output directory."""
    dst = tmp_path / "out"
    shutil.copytree(pipeline_run["out"], dst)
    return dst
