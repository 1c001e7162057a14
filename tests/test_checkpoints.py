"""Our own encoder checkpoints: safetensors + JSON, round trip, and the `local` backend."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from prune.embed.backends import (
    WeightsNotFoundError,
    check_weights,
    make_embedder,
    model_id_for,
    preprocess_spec_for,
)
from prune.embed.checkpoints import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    build_model,
    load_encoder,
    save_encoder,
)
from prune.embed.decode import PreprocessSpec
from prune.embed.settings import EmbedConfig

ARCH, KW = "resnet18", {"in_chans": 3}
SPEC = PreprocessSpec(size=64, mean=(0.286,) * 3, std=(0.353,) * 3, interpolation="bilinear")


def _checkpoint(path, seed=0):
    torch.manual_seed(seed)
    model = build_model(ARCH, KW)
    save_encoder(str(path), model, ARCH, KW, SPEC, extra={"trained_on": "test"})
    return model


def test_round_trip_gives_identical_embeddings(tmp_path):
    model = _checkpoint(tmp_path / "ck")
    loaded, config = load_encoder(str(tmp_path / "ck"))
    assert config["architecture"] == ARCH and config["trained_on"] == "test"
    x = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model.eval()(x), loaded(x))
    assert not list(tmp_path.glob("ck/.*tmp"))  # no temporary file left behind
    with open(tmp_path / "ck" / WEIGHTS_FILE, "rb") as f:
        assert not f.read(2).startswith(b"\x80")  # safetensors, not a pickle


def test_local_backend_embeds_with_the_checkpoints_preprocessing(tmp_path):
    model = _checkpoint(tmp_path / "ck")
    cfg = EmbedConfig(backend="local", model="ignored", pretrained=str(tmp_path / "ck"), precision="fp32")
    check_weights(cfg)
    assert preprocess_spec_for(cfg) == SPEC
    emb = make_embedder(cfg)
    assert emb.preprocess == SPEC and emb.dim == model.num_features and not emb.random_init
    pixels = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    vecs = emb.embed(pixels)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    from prune.embed.decode import normalize

    with torch.inference_mode():
        ref = torch.nn.functional.normalize(model.eval()(normalize(pixels, SPEC)), dim=-1).numpy()
    np.testing.assert_allclose(vecs, ref, atol=1e-5)


def test_model_id_follows_the_weights(tmp_path):
    _checkpoint(tmp_path / "a", seed=0)
    _checkpoint(tmp_path / "b", seed=1)
    ids = {model_id_for(EmbedConfig(backend="local", pretrained=str(tmp_path / d))) for d in "ab"}
    assert len(ids) == 2 and all(i.startswith(f"local:{ARCH}:") for i in ids)


def test_missing_or_foreign_checkpoint_is_named(tmp_path):
    with pytest.raises(WeightsNotFoundError, match=CONFIG_FILE):
        check_weights(EmbedConfig(backend="local", pretrained=str(tmp_path / "nothing")))
    _checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / CONFIG_FILE).write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="not an ssl-prune encoder config"):
        load_encoder(str(tmp_path / "ck"))


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    _checkpoint(tmp_path / "a", seed=0)
    _checkpoint(tmp_path / "b", seed=1)
    (tmp_path / "a" / WEIGHTS_FILE).write_bytes((tmp_path / "b" / WEIGHTS_FILE).read_bytes())
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        load_encoder(str(tmp_path / "a"))


def test_small_resnet_is_a_timm_architecture_for_small_images(tmp_path):
    """prune/embed/models.py registers it with timm, so a checkpoint names it like any timm model."""
    kw = {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}
    torch.manual_seed(0)
    model = build_model("small_resnet", kw)
    assert model.conv1.stride == (1, 1) and model.num_features == 64
    save_encoder(str(tmp_path / "ck"), model, "small_resnet", kw, PreprocessSpec(size=28))
    loaded, _ = load_encoder(str(tmp_path / "ck"))
    x = torch.randn(2, 3, 28, 28)
    with torch.inference_mode():
        assert torch.equal(model.eval()(x), loaded(x))
