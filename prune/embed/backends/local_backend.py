"""The local backend: an encoder checkpoint of our own (prune/embed/checkpoints.py), safetensors + JSON."""

from __future__ import annotations

from typing import Optional

from prune.embed.backends.base import BACKENDS
from prune.embed.backends.timm_backend import TimmEmbedder
from prune.embed.checkpoints import load_encoder, preprocess_of, read_config
from prune.embed.decode import PreprocessSpec
from prune.embed.errors import WeightsNotFoundError
from prune.embed.settings import EmbedConfig


@BACKENDS.register
class LocalEmbedder(TimmEmbedder):
    """`embed.pretrained` is the checkpoint directory; its encoder.json names a timm architecture."""

    name = "local"

    @classmethod
    def find_weights(cls, cfg: EmbedConfig) -> str:
        if not cfg.pretrained:
            raise WeightsNotFoundError("embed.backend=local needs embed.pretrained: the checkpoint directory")
        read_config(cfg.pretrained)  # names the missing file, if any
        return cfg.pretrained

    @classmethod
    def known_models(cls) -> None:
        return None  # the architecture is the checkpoint's (encoder.json); embed.model is not read

    @classmethod
    def spec_for(cls, cfg: EmbedConfig) -> PreprocessSpec:
        return preprocess_of(read_config(cls.find_weights(cfg)))

    @classmethod
    def id_for(cls, cfg: EmbedConfig) -> str:
        config = read_config(cls.find_weights(cfg))
        return f"local:{config['architecture']}:{config['weights_sha256'][:16]}"

    def __init__(self, cfg: EmbedConfig, device: Optional[str] = None):
        self._setup_device(cfg, device)
        model, config = load_encoder(self.find_weights(cfg))
        self._place(model, preprocess_of(config), self.id_for(cfg))
