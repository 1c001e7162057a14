"""The encoder committed in models/fmnist-simclr: a valid checkpoint that knows Fashion-MNIST.

CI never retrains it (configs/train_fmnist.yaml does, in about half an hour); these tests check
that what is committed loads, matches its sha256, is small, and separates the classes far
better than the same architecture with random weights.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from pipelines.cli.config import load_config
from prune.demo.fashion_mnist import load_fashion_mnist
from prune.demo.shards import encode_image
from prune.embed.backends import check_weights, make_embedder
from prune.embed.checkpoints import (
    WEIGHTS_FILE,
    build_model,
    preprocess_of,
    read_config,
    save_encoder,
)
from prune.embed.decode import decode_image
from prune.embed.settings import EmbedConfig
from prune.evaluate.probes import accuracy, knn_predict

from .conftest import REPO

SHIPPED = os.path.join(REPO, "models", "fmnist-simclr")


def test_the_shipped_encoder_is_a_small_local_checkpoint_the_demo_uses(monkeypatch):
    config = read_config(SHIPPED)
    assert os.path.getsize(os.path.join(SHIPPED, WEIGHTS_FILE)) < 8 * 2**20
    assert config["preprocess"]["size"] == 28 and config["embed_dim"] == 256
    monkeypatch.chdir(REPO)  # the demo config names it relative to the repository root
    demo = load_config(os.path.join(REPO, "configs", "demo.yaml"))
    assert demo.embed.backend == "local" and os.path.samefile(demo.embed.pretrained, SHIPPED)
    check_weights(demo.embed)


def _crops(images, spec):
    """Through the pipeline's own path: JPEG as in the demo shards, then decode_image."""
    return np.stack([decode_image(encode_image(im), spec)[0] for im in images])


def test_the_shipped_encoder_separates_classes_better_than_random_weights(tmp_path):
    x, y = load_fashion_mnist("train")
    train, train_y, test, test_y = x[:2000], y[:2000], x[50000:51000], y[50000:51000]
    config = read_config(SHIPPED)
    torch.manual_seed(0)
    save_encoder(str(tmp_path / "random"), build_model(config["architecture"], config["model_kwargs"]),
                 config["architecture"], config["model_kwargs"], preprocess_of(config))
    scores = {}
    for name, path in (("shipped", SHIPPED), ("random", str(tmp_path / "random"))):
        emb = make_embedder(EmbedConfig(backend="local", pretrained=path, precision="fp32", torch_threads=2))
        tr, te = emb.embed(_crops(train, emb.preprocess)), emb.embed(_crops(test, emb.preprocess))
        scores[name] = accuracy(knn_predict(tr, train_y, te, k=20), test_y)
    assert scores["shipped"] > 0.75 and scores["shipped"] > scores["random"] + 0.05, scores
