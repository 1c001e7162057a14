"""train-encoder: SimCLR pieces, optimizer state without pickle, and Ray Train end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipelines.cli.config import TrainEncoderConfig, load_config, validate_config
from prune.embed.backends import make_embedder
from prune.embed.checkpoints import (
    build_model,
    load_optimizer,
    optimizer_tensors,
    read_config,
    save_tensors,
)
from prune.embed.settings import EmbedConfig
from prune.settings import ConfigError
from prune.train.settings import AugmentConfig
from prune.train.ssl import augment, lr_at, nt_xent

MEAN, STD = (0.5,) * 3, (0.25,) * 3
PLAIN = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=False, brightness=0, contrast=0, jitter_prob=0)


def _pixels(n=6, size=16, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def test_augment_without_randomness_is_exactly_the_normalized_input():
    x = _pixels()
    out = augment(x, PLAIN, 16, MEAN, STD, torch.Generator().manual_seed(0))
    expected = (x.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    assert out.shape == (6, 3, 16, 16)
    assert torch.allclose(out, expected, atol=1e-4)


def test_augment_flips_some_samples_and_only_by_mirroring():
    x = _pixels(n=64)
    out = augment(x, PLAIN.model_copy(update={"hflip": True}), 16, MEAN, STD, torch.Generator().manual_seed(0))
    plain = (x.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    same = torch.isclose(out, plain, atol=1e-4).flatten(1).all(1)
    mirrored = torch.isclose(out, plain.flip(-1), atol=1e-4).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 10 < int(mirrored.sum()) < 54


def test_augment_is_seeded_and_stays_in_range():
    x = _pixels(n=8, size=28)
    cfg = AugmentConfig(grayscale_prob=0.5, blur_prob=0.5, erase_prob=0.5, saturation=0.4)
    a = augment(x, cfg, 32, MEAN, STD, torch.Generator().manual_seed(3))
    b = augment(x, cfg, 32, MEAN, STD, torch.Generator().manual_seed(3))
    c = augment(x, cfg, 32, MEAN, STD, torch.Generator().manual_seed(4))
    assert a.shape == (8, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    lo, hi = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25
    assert float(a.min()) >= lo - 1e-5 and float(a.max()) <= hi + 1e-5


def _nt_xent_reference(z1, z2, t):
    """The textbook loop: for each of the 2N views, -log softmax of its twin among the other 2N-1."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        twin = (i + n) % (2 * n)
        sims = torch.stack([z[i] @ z[j] / t for j in range(2 * n) if j != i])
        others = [j for j in range(2 * n) if j != i]
        total = total - (sims[others.index(twin)] - torch.logsumexp(sims, 0))
    return total / (2 * n)


def test_nt_xent_matches_the_textbook_definition_and_rewards_agreement():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    assert torch.allclose(nt_xent(z1, z2, 0.2), _nt_xent_reference(z1, z2, 0.2), atol=1e-5)
    assert nt_xent(z1, z1 + 0.01 * z2, 0.2) < nt_xent(z1, z2, 0.2)


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = [lr_at(s, 100, 1.0, 10) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[100] == pytest.approx(0.0)


def test_optimizer_state_round_trips_without_pickle(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = build_model("resnet18", {"channels": [8, 8, 16, 16], "stem_width": 8})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(4, 3, 32, 32)
    model(x).pow(2).mean().backward()
    opt.step()
    tensors, groups = optimizer_tensors(opt)
    save_tensors(str(tmp_path / "opt.safetensors"), tensors)
    tensors = load_file(str(tmp_path / "opt.safetensors"))  # what a checkpoint gives back
    groups = json.loads(json.dumps(groups))

    clone = build_model("resnet18", {"channels": [8, 8, 16, 16], "stem_width": 8})
    clone.load_state_dict(model.state_dict())
    opt2 = torch.optim.AdamW(clone.parameters(), lr=1e-3)
    load_optimizer(opt2, tensors, groups)
    for m, o in ((model, opt), (clone, opt2)):
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def test_train_config_names_the_bad_key():
    with pytest.raises(ConfigError, match="train.augment.crop_scale"):
        load_config(None, ["input=a", "output=b", "train.augment.crop_scale=[0.9,0.2]"], TrainEncoderConfig)
    with pytest.raises(ConfigError, match="unknown config key 'train.optimizer'"):
        load_config(None, ["input=a", "output=b", "train.optimizer=sgd"], TrainEncoderConfig)


def _train_cfg(shards, out, **train):
    return validate_config({
        "input": str(shards), "output": str(out),
        "decode": {"batch_size": 64, "num_cpus": 0.5},
        "train": {
            "architecture": "resnet18", "model_kwargs": {"channels": [16, 32, 64, 128], "stem_width": 16},
            "image_size": 32, "mean": [0.286] * 3, "std": [0.353] * 3, "projection_hidden": 128,
            "projection_dim": 64, "batch_size": 32, "epochs": 50, "lr": 3e-3, "warmup_steps": 5,
            "num_workers": 2, "cpus_per_worker": 0.5, "torch_threads": 1, "checkpoint_every_steps": 10,
            **train,
        },
    }, TrainEncoderConfig)


def test_train_encoder_loss_falls_resumes_and_exports_a_local_encoder(ray_cluster, shards_dir, pipeline_run, tmp_path):
    """2 gloo workers on real shards (bad ones included): the loss falls, a re-run resumes, the
    exported encoder is a `local` checkpoint the embed stage loads."""
    from pipelines.cli import train_encoder

    out = tmp_path / "enc"
    first = train_encoder(_train_cfg(shards_dir["dir"], out, max_steps=30))
    counts = pipeline_run["manifest"]["counts"]  # the same shards through `run`: the bad samples are left out
    assert first.steps == 30 and first.samples == counts["kept"] + counts["pruned"]
    losses = [h["loss"] for h in first.history if h["loss"] is not None]
    assert len(losses) >= 3 and losses[-1] < losses[0] - 0.1, losses
    assert losses[0] < math.log(2 * 64 - 1) + 0.5  # starts near chance: log(2N - 1) over the global batch

    second = train_encoder(_train_cfg(shards_dir["dir"], out, max_steps=40))
    assert second.steps == 40
    assert [h["step"] for h in second.history][: len(first.history)] == [h["step"] for h in first.history]

    config = read_config(str(out))
    assert config["architecture"] == "resnet18" and config["preprocess"]["size"] == 32 and config["train_step"] == 40
    emb = make_embedder(EmbedConfig(backend="local", pretrained=str(out), precision="fp32", torch_threads=1))
    vecs = emb.embed(_pixels(n=4, size=32).numpy())
    assert vecs.shape == (4, 128) and np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)

    # refused on the driver before any decoding or worker start (a ValueError, not Ray Train's wrapped one)
    with pytest.raises(ValueError, match="another architecture"):
        train_encoder(_train_cfg(shards_dir["dir"], out, max_steps=50, projection_dim=32))
