"""Embedder backends: one interface, weights offline, the model's own preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from prune.embed.backends import (
    WeightsNotFoundError,
    check_weights,
    make_embedder,
    model_id_for,
    preprocess_spec_for,
)
from prune.embed.decode import decode_image, normalize
from prune.embed.settings import EmbedConfig

TIMM = dict(backend="timm", model="vit_tiny_patch16_224", allow_random_init=True, precision="fp32", torch_threads=2)
CLIP = dict(backend="open_clip", model="ViT-S-32", allow_random_init=True, precision="fp32", torch_threads=2)


def _photo(w, h, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("size", [(300, 200), (180, 420), (28, 28)])
def test_timm_geometry_matches_timms_own_eval_transform(size):
    import timm
    from timm.data import create_transform, resolve_data_config

    spec = preprocess_spec_for(EmbedConfig(**TIMM))
    assert spec.crop_pct == pytest.approx(0.9)
    model = timm.create_model(TIMM["model"], pretrained=False, num_classes=0)
    reference = create_transform(**resolve_data_config({}, model=model))
    img = _photo(*size)
    import io

    buf = io.BytesIO()
    img.save(buf, "PNG")
    crop, status = decode_image(buf.getvalue(), spec, draft=False)
    assert status == "ok"
    ours = normalize(crop[None], spec)[0]
    theirs = reference(img)
    assert ours.shape == theirs.shape
    assert torch.max(torch.abs(ours - theirs)).item() < 1e-5


@pytest.mark.parametrize("kw", [TIMM, CLIP], ids=["timm", "open_clip"])
def test_each_backend_embeds_a_batch_deterministically(kw):
    cfg = EmbedConfig(**kw)
    a, b = make_embedder(cfg), make_embedder(cfg)
    assert a.preprocess == preprocess_spec_for(cfg)  # the decode tasks and the actors agree
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, a.preprocess.size, a.preprocess.size, 3), dtype=np.uint8)
    va, vb = a.embed(pixels), b.embed(pixels)
    assert va.shape == (3, a.dim) and va.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(va, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(va, vb)  # same seed, same random init in every actor
    assert a.random_init and a.model_id.startswith(f"{kw['backend']}:{kw['model']}:random-init")
    assert np.abs(va[0] - va[1]).max() > 0  # different images, different vectors


@pytest.mark.parametrize("kw", [TIMM, CLIP], ids=["timm", "open_clip"])
def test_bf16_agrees_with_fp32(kw):
    fp32 = make_embedder(EmbedConfig(**kw))
    bf16 = make_embedder(EmbedConfig(**(kw | {"precision": "bf16"})))
    pixels = np.random.default_rng(1).integers(0, 256, (4, fp32.preprocess.size, fp32.preprocess.size, 3), dtype=np.uint8)
    cos = (fp32.embed(pixels) * bf16.embed(pixels)).sum(axis=1)
    assert cos.min() > 0.99


def test_missing_weights_are_named_for_every_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsNotFoundError, match="augreg_in21k_ft_in1k.*not on this machine"):
        check_weights(EmbedConfig(backend="timm", model="vit_tiny_patch16_224", pretrained="augreg_in21k_ft_in1k",
                                  cache_dir=str(tmp_path / "hf"), download=False))
    with pytest.raises(WeightsNotFoundError, match="laion2b_s34b_b79k.*not on this machine"):
        check_weights(EmbedConfig(model="ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=str(tmp_path / "hf"),
                                  download=False))
    with pytest.raises(WeightsNotFoundError, match="allow_random_init"):
        check_weights(EmbedConfig(model="ViT-B-32"))


def test_timm_weights_load_from_a_local_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    src = timm.create_model(TIMM["model"], pretrained=False, num_classes=0)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    emb = make_embedder(EmbedConfig(**(TIMM | {"allow_random_init": False, "pretrained": str(path), "seed": 123})))
    assert not emb.random_init and emb.model_id.endswith("weights.safetensors")
    for name, tensor in src.state_dict().items():
        assert torch.equal(emb.model.state_dict()[name], tensor), name


# --- an open_clip checkpoint directory (open_clip_config.json + open_clip_model.safetensors) ---------

def _clip_dir(path, dtype="float32"):
    """A tiny CLIP written as `train-clip` writes it (open_clip's own layout), with random weights."""
    from prune.train.clip import build_clip, save_clip
    from prune.train.clip_settings import ClipModelConfig

    cfg = ClipModelConfig(embed_dim=32, vision={"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
                          text={"context_length": 16, "width": 32, "heads": 2, "layers": 1},
                          mean=(0.3, 0.3, 0.3), std=(0.4, 0.4, 0.4), interpolation="bilinear")
    torch.manual_seed(0)
    save_clip(str(path), build_clip(cfg), cfg, dtype)
    return str(path)


def test_an_open_clip_directory_embeds_as_open_clip_itself_does(tmp_path):
    """embed.pretrained=DIR: the image and text embeddings are open_clip's own encode_image /
    encode_text of the model create_model("local-dir:DIR") builds, on the same inputs."""
    import open_clip

    d = _clip_dir(tmp_path / "clip")
    cfg = EmbedConfig(backend="open_clip", pretrained=d, precision="fp32", text=True, torch_threads=2)
    check_weights(cfg)
    emb = make_embedder(cfg)
    spec = preprocess_spec_for(cfg)
    assert emb.preprocess == spec and (spec.size, spec.mean, spec.interpolation) == (32, (0.3,) * 3, "bilinear")
    reference = open_clip.create_model(f"local-dir:{d}").eval()
    pixels = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    captions = ["a photo of a sneaker", "dark ankle boots", "x", "women's plain white tee, size M on sale"]
    with torch.no_grad():
        image = torch.nn.functional.normalize(reference.encode_image(normalize(pixels, spec)), dim=-1).numpy()
        text = reference.encode_text(open_clip.get_tokenizer(f"local-dir:{d}")(captions), normalize=True).numpy()
    np.testing.assert_allclose(emb.embed(pixels), image, atol=1e-5)
    np.testing.assert_allclose(emb.embed_text(captions), text, atol=1e-5)
    # open_clip's own spelling is accepted too, and names the same model
    assert make_embedder(EmbedConfig(backend="open_clip", pretrained=f"local-dir:{d}", precision="fp32")).model_id == emb.model_id


def test_an_open_clip_directory_is_identified_by_its_weights_not_its_path(tmp_path):
    import hashlib
    import shutil

    d = _clip_dir(tmp_path / "a")
    moved = shutil.copytree(d, tmp_path / "b")
    ids = [model_id_for(EmbedConfig(backend="open_clip", pretrained=str(p))) for p in (d, moved)]
    sha = hashlib.sha256(open(f"{d}/open_clip_model.safetensors", "rb").read()).hexdigest()
    assert ids == [f"open_clip:local-dir:{sha[:16]}"] * 2
    _clip_dir(tmp_path / "b", dtype="float16")  # other weights in the same place: another id
    assert model_id_for(EmbedConfig(backend="open_clip", pretrained=str(moved))) != ids[0]


def test_an_incomplete_open_clip_directory_is_named_in_one_line(tmp_path):
    d = tmp_path / "clip"
    d.mkdir()
    cfg = EmbedConfig(backend="open_clip", pretrained=str(d))
    with pytest.raises(WeightsNotFoundError, match=r"has no open_clip_config\.json .*open_clip_model\.safetensors") as e:
        check_weights(cfg)
    assert "\n" not in str(e.value)
    _clip_dir(d)
    (d / "open_clip_model.safetensors").unlink()
    with pytest.raises(WeightsNotFoundError, match=r"has open_clip_config\.json but no weights") as e:
        check_weights(cfg)
    assert "\n" not in str(e.value)
    with pytest.raises(WeightsNotFoundError, match="no directory"):
        check_weights(EmbedConfig(backend="open_clip", pretrained=f"local-dir:{tmp_path / 'nowhere'}"))
