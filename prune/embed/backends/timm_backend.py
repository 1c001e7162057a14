"""The timm backend: pooled features of a timm image model (e.g. DINOv2), weights from the local cache."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from prune.embed.backends.base import BACKENDS, Embedder
from prune.embed.decode import PreprocessSpec, normalize
from prune.embed.errors import WeightsNotFoundError
from prune.embed.hub import HubFile
from prune.embed.settings import EmbedConfig

TIMM_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")  # as timm's hub loader


def _timm_weights(cfg: EmbedConfig) -> Optional[str]:
    """A local weights file for a timm model: a path, or `model.tag` found in the HF cache."""
    import timm

    path = os.path.expanduser(cfg.pretrained)
    if os.path.isfile(path):
        return path
    name = f"{cfg.model}.{cfg.pretrained}"
    pcfg = timm.models.get_pretrained_cfg(name)
    if pcfg is None:
        raise WeightsNotFoundError(
            f"embed.pretrained={cfg.pretrained!r} is neither a weights file nor a timm tag of {cfg.model}"
        )
    from huggingface_hub import try_to_load_from_cache

    looked = []
    for filename in TIMM_WEIGHTS:
        if pcfg.hf_hub_id:
            found = try_to_load_from_cache(pcfg.hf_hub_id, filename, cache_dir=cfg.cache_dir)
            if isinstance(found, str):
                return found
            looked.append(f"{pcfg.hf_hub_id}/{filename}")
    raise WeightsNotFoundError(
        f"weights for timm {name} are not on this machine. Looked in the Hugging Face cache for: "
        f"{'; '.join(looked) or 'nothing (no hub id)'}. Let the driver fetch them once (embed.download), copy "
        f"the cache from a machine with network, or set embed.pretrained to the weights file's path."
    )


def timm_preprocess_spec(cfg: EmbedConfig) -> PreprocessSpec:
    """timm's eval transform for this model (resize to size/crop_pct, center crop), from its config."""
    import timm

    name = cfg.model
    if cfg.pretrained and not os.path.isfile(os.path.expanduser(cfg.pretrained)):
        name = f"{cfg.model}.{cfg.pretrained}"
    pcfg = timm.models.get_pretrained_cfg(name)
    if pcfg is None:
        raise ValueError(f"embed.model={cfg.model!r} is not a timm model with a known input configuration")
    if getattr(pcfg, "crop_mode", "center") not in ("center", None):
        raise ValueError(f"timm crop_mode {pcfg.crop_mode!r} of {name} is not supported (only 'center')")
    return PreprocessSpec(
        size=int(pcfg.input_size[-1]),
        mean=tuple(pcfg.mean),
        std=tuple(pcfg.std),
        interpolation=pcfg.interpolation or "bicubic",
        resize_mode="shortest",
        crop_pct=float(pcfg.crop_pct or 1.0),
    )


@BACKENDS.register
class TimmEmbedder(Embedder):
    """A timm image model's pooled features (e.g. DINOv2 `vit_small_patch14_dinov2`)."""

    name = "timm"

    @classmethod
    def spec_for(cls, cfg: EmbedConfig) -> PreprocessSpec:
        return timm_preprocess_spec(cfg)

    @classmethod
    def find_weights(cls, cfg: EmbedConfig) -> str:
        return _timm_weights(cfg)

    @classmethod
    def hub_files(cls, cfg: EmbedConfig) -> list[HubFile]:
        """A timm tag's weights on the hub its pretrained config names; nothing for a path."""
        import timm

        if not cfg.pretrained or os.path.isfile(os.path.expanduser(cfg.pretrained)):
            return []
        pcfg = timm.models.get_pretrained_cfg(f"{cfg.model}.{cfg.pretrained}")
        return [HubFile(pcfg.hf_hub_id, TIMM_WEIGHTS)] if pcfg is not None and pcfg.hf_hub_id else []

    @classmethod
    def known_models(cls) -> list[str]:
        import timm

        return timm.list_models()

    def __init__(self, cfg: EmbedConfig, device: Optional[str] = None):
        import timm
        import torch

        self._setup_device(cfg, device)
        if not cfg.pretrained and not cfg.allow_random_init:
            raise WeightsNotFoundError(
                f"embed.pretrained is not set for timm {cfg.model}: give a tag found in the local cache "
                f"or a weights file (or embed.allow_random_init=true for a smoke test)"
            )
        torch.manual_seed(cfg.seed)  # random init must be identical in every actor
        if cfg.pretrained:
            weights = _timm_weights(cfg)
            model = timm.create_model(cfg.model, pretrained=True, num_classes=0,
                                      pretrained_cfg_overlay={"file": weights})
        else:
            model = timm.create_model(cfg.model, pretrained=False, num_classes=0)
            self.random_init = True
        self._place(model, timm_preprocess_spec(cfg), self.id_for(cfg))

    def _place(self, model, spec: PreprocessSpec, model_id: str) -> None:
        import torch

        self.preprocess, self.model_id, self.dim = spec, model_id, int(model.num_features)
        self.model = model.eval().to(self.device)
        if self.precision == "bf16":
            self.model = self.model.to(torch.bfloat16)

    def embed(self, pixels_uint8: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        if len(pixels_uint8) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode():
            x = normalize(pixels_uint8, self.preprocess, self.device)
            if self.precision == "bf16":
                with torch.autocast(self.device, dtype=torch.bfloat16):
                    feats = self.model(x.to(torch.bfloat16)).float()
            else:
                feats = self.model(x).float()
            return F.normalize(feats, dim=-1).cpu().numpy().astype(np.float32)
