"""train-clip: a CLIP (open_clip's model, tokenizer and loss) trained on real shards, written in the
layout open_clip loads; the shipped one (models/fmnist-clip) and the images it was trained on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.cli.config import TrainClipConfig, load_config, validate_config
from prune.demo.captions import describe
from prune.demo.fashion_mnist import CLASS_NAMES, load_fashion_mnist
from prune.demo.shards import encode_image, write_demo_shards
from prune.demo.web_like import write_web_like_shards
from prune.embed.backends import make_embedder, model_id_for
from prune.embed.decode import decode_image
from prune.embed.settings import EmbedConfig
from prune.evaluate.pretrain import zero_shot_predict, zero_shot_weights
from prune.settings import ConfigError
from prune.train.clip import (
    RECORD_FILE,
    clip_train_indices,
    evaluation_train_indices,
    indices_sha256,
    web_like_train_indices,
)

from .conftest import REPO, subprocess_env

SHIPPED = os.path.join(REPO, "models", "fmnist-clip")
TINY = {"embed_dim": 32, "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        "text": {"context_length": 16, "width": 32, "heads": 2, "layers": 1}}


def _cfg(shards, out, **train):
    return validate_config({
        "input": str(shards), "output": str(out), "decode": {"batch_size": 32}, "model": TINY,
        "train": {"batch_size": 16, "max_steps": 4, "warmup_steps": 1, "num_cpus": 1, "torch_threads": 1,
                  "precision": "fp32", **train},
    }, TrainClipConfig)


def test_train_clip_writes_a_directory_open_clip_and_the_backend_load(ray_cluster, tmp_path):
    from pipelines.cli import train_clip

    shards = tmp_path / "shards"
    write_demo_shards(str(shards), count=48, shard_size=24, seed=2)
    out = tmp_path / "clip"
    stats = train_clip(_cfg(shards, out))
    assert (stats.pairs, stats.steps, stats.without_caption, stats.failed) == (48, 4, 0, {})
    assert np.isfinite(stats.loss) and stats.model_id == model_id_for(EmbedConfig(backend="open_clip", pretrained=str(out)))

    model = open_clip.create_model(f"local-dir:{out}").eval()  # open_clip's own loader, strict
    assert isinstance(model, open_clip.CLIP) and model.visual.image_size == (32, 32) and model.context_length == 16
    emb = make_embedder(EmbedConfig(backend="open_clip", pretrained=str(out), precision="fp32", text=True, torch_threads=1))
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    captions = ["a photo of a trouser", "a photo of a bag", "a photo of an ankle boot"]
    with torch.no_grad():
        x = (torch.from_numpy(pixels).permute(0, 3, 1, 2) / 255 - torch.tensor(emb.preprocess.mean).view(1, 3, 1, 1)) \
            / torch.tensor(emb.preprocess.std).view(1, 3, 1, 1)
        image = model.encode_image(x, normalize=True).numpy()
        text = model.encode_text(open_clip.get_tokenizer(f"local-dir:{out}")(captions), normalize=True).numpy()
    np.testing.assert_allclose(emb.embed(pixels), image, atol=1e-5)
    np.testing.assert_allclose(emb.embed_text(captions), text, atol=1e-5)

    record = json.loads((out / RECORD_FILE).read_text())
    assert record["data"]["pairs"] == 48 and len(record["data"]["shards"]) == 2 and record["settings"]["model"]["embed_dim"] == 32
    again = train_clip(_cfg(shards, out))  # complete: reused, not trained again
    assert again == stats and json.loads((out / RECORD_FILE).read_text()) == record

    with pytest.raises(ConfigError, match=r"48 decodable image-caption pairs.*train\.batch_size 64"):
        train_clip(_cfg(shards, tmp_path / "too-few", batch_size=64))


def test_a_bad_train_clip_config_names_the_key():
    with pytest.raises(ConfigError, match=r"'model\.vision'.*patch_size 5 must divide image_size 32"):
        load_config(None, ["input=a", "output=b", "model.vision.patch_size=5"], TrainClipConfig)
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.optimizer'"):
        load_config(None, ["input=a", "output=b", "train.optimizer=sgd"], TrainClipConfig)
    with pytest.raises(ConfigError, match=r"'model\.text\.context_length'"):
        load_config(None, ["input=a", "output=b", "model.text.context_length=100"], TrainClipConfig)
    shipped = load_config("train_clip_fmnist", [], TrainClipConfig)  # the shipped config, by name
    assert shipped.output == "models/fmnist-clip" and shipped.model.vision.patch_size == 4


def test_the_cli_verb_reports_a_bad_key_in_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pipelines.cli", "train-clip", "train_clip_fmnist", "train.epoch=3"],
                         cwd=tmp_path, env=subprocess_env(PYTHONPATH=REPO), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "unknown config key 'train.epoch'; did you mean 'train.epochs'?" in res.stderr


def test_the_training_images_are_none_an_evaluation_pool_draws(tmp_path):
    _, labels = load_fashion_mnist("train")
    # the replay of the web-like pool's draw is that pool's: on a real one, built here
    pool = write_web_like_shards(str(tmp_path / "web"), count=400, shard_size=400, seed=7)
    meta = pq.read_table(pool.tars[0].replace(".tar", ".parquet")).to_pydict()
    used = sorted({i for i, kind in zip(meta["index"], meta["kind"]) if kind != "junk"})
    assert used == web_like_train_indices(labels, 400, 7).tolist()

    chosen = clip_train_indices(labels, 1700, 0)
    assert len(chosen) == 17000 and np.bincount(labels[chosen]).tolist() == [1700] * 10
    for name, drawn in evaluation_train_indices(labels).items():
        assert not np.intersect1d(chosen, drawn).size, name
    pool_record = json.loads(open(os.path.join(SHIPPED, "clip_pool.json")).read())
    assert pool_record["indices_sha256"] == indices_sha256(clip_train_indices(labels, pool_record["per_class"],
                                                                               pool_record["seed"]))


def _shipped(text=True):
    return make_embedder(EmbedConfig(backend="open_clip", pretrained=SHIPPED, precision="fp32", text=text, torch_threads=2))


def test_the_shipped_clip_is_small_and_tells_matching_captions_from_wrong_ones():
    """On 100 t10k images: the image's own caption (the caption builder's, the class's nouns and
    what its pixels show) is nearer than a wrong-class caption far more often than not, and
    class-name prompts classify most of them."""
    assert os.path.getsize(os.path.join(SHIPPED, "open_clip_model.safetensors")) < 20 * 2**20
    record = json.loads(open(os.path.join(SHIPPED, RECORD_FILE)).read())
    emb = _shipped()
    assert emb.model_id == record["model_id"] and emb.preprocess.size == 32
    images, labels = load_fashion_mnist("test")
    images, labels = images[:100], labels[:100]
    crops = np.stack([decode_image(encode_image(im), emb.preprocess)[0] for im in images])
    vec = emb.embed(crops)
    rng = np.random.default_rng(0)
    right = emb.embed_text([describe(int(y), im, rng) for y, im in zip(labels, images)])
    wrong = emb.embed_text([describe(int((y + rng.integers(1, 10)) % 10), im, rng) for y, im in zip(labels, images)])
    wins = ((vec * right).sum(1) > (vec * wrong).sum(1)).mean()
    weights = zero_shot_weights(emb.embed_text, CLASS_NAMES)  # the pretraining judge's prompts and names
    zero_shot = (zero_shot_predict(vec, weights) == labels).mean()
    assert wins > 0.9 and zero_shot > 0.6, (wins, zero_shot)
