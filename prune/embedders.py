"""Image embedders: one interface, one class per backend, weights from local files only.

An embedder turns a batch of uint8 crops (made by `decode.py` to its `preprocess` spec) into
L2-normalized float32 vectors. Weights are resolved from a file path or the local
open_clip / Hugging Face cache; nothing is downloaded, and a missing weight is one error
that says what is missing and how to provide it.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Optional

import numpy as np

from .config import EmbedConfig
from .decode import PreprocessSpec, normalize


class WeightsNotFoundError(FileNotFoundError):
    """The configured weights are not on this machine."""


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX), where bf16 pays off."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("embed.device is 'cuda' but torch sees no CUDA device on this worker")
    return device


def resolve_precision(precision: str, device: str) -> str:
    import torch

    if precision != "auto":
        return precision
    if device == "cuda":
        # native bf16 only (Ampere and newer): emulated bf16 on V100/T4 is slower than fp32
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"


def model_id_for(cfg: EmbedConfig) -> str:
    """backend:model:weights, where weights is the tag, the checkpoint's file name or random-init."""
    if cfg.backend == "local":
        from .checkpoints import read_config

        config = read_config(cfg.pretrained)
        return f"local:{config['architecture']}:{config['weights_sha256'][:16]}"
    if cfg.pretrained:
        path = os.path.expanduser(cfg.pretrained)
        tag = os.path.basename(path) if os.path.isfile(path) else cfg.pretrained
    else:
        tag = f"random-init-seed{cfg.seed}"
    return f"{cfg.backend}:{cfg.model}:{tag}"


class Embedder(ABC):
    """Batch of uint8 NHWC crops -> float32 [N, dim], each row of unit length."""

    model_id: str
    preprocess: PreprocessSpec
    dim: int
    random_init: bool = False

    @abstractmethod
    def embed(self, pixels_uint8: np.ndarray) -> np.ndarray: ...

    def _setup_device(self, cfg: EmbedConfig, device: Optional[str]) -> None:
        """Device, precision and CPU threads, the same way for every backend."""
        import torch

        self.device = resolve_device(device or cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        if cfg.torch_threads and self.device == "cpu":
            torch.set_num_threads(cfg.torch_threads)


def resolve_open_clip_weights(model: str, pretrained: str, cache_dir: Optional[str]) -> str:
    """A checkpoint path for `pretrained` (a file, or a tag found in the local cache)."""
    import open_clip

    if os.path.isfile(os.path.expanduser(pretrained)):
        return os.path.expanduser(pretrained)
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained not in tags:
        raise WeightsNotFoundError(
            f"embed.pretrained={pretrained!r} is neither a checkpoint file nor a known tag of "
            f"{model} (tags: {', '.join(tags) or 'none'})"
        )
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    candidates: list[str] = []
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        # open_clip's convention: "org/repo/file" names a file, "org/repo/" the default file
        repo_id, filename = os.path.split(cfg["hf_hub"])
        filename = filename or open_clip.pretrained.HF_WEIGHTS_NAME
        # the safetensors names open_clip itself prefers, then the file named
        names = [*open_clip.pretrained._get_safe_alternatives(filename), filename]
        for name in names:
            found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(found, str):
                return found
            candidates.append(f"Hugging Face cache: {repo_id}/{name}")
    if cfg.get("url"):
        root = cache_dir or os.path.expanduser("~/.cache/clip")
        path = os.path.join(root, os.path.basename(cfg["url"]))
        if os.path.isfile(path):
            return path
        candidates.append(path)
    raise WeightsNotFoundError(
        f"weights for {model} tag {pretrained!r} are not on this machine and are never downloaded "
        f"at run time. Looked in: {'; '.join(candidates)}. Copy the checkpoint there (e.g. with "
        f"huggingface-cli download on a machine with network, then copy the cache), or set "
        f"embed.pretrained to the checkpoint file's path."
    )


class OpenClipEmbedder(Embedder):
    """The image tower of any `open_clip.list_models()` architecture."""

    def __init__(self, cfg: EmbedConfig, device: Optional[str] = None):
        import open_clip
        import torch

        if cfg.model not in open_clip.list_models():
            raise ValueError(f"embed.model={cfg.model!r} is not an open_clip architecture")
        self._setup_device(cfg, device)
        if cfg.pretrained:
            weights = resolve_open_clip_weights(cfg.model, cfg.pretrained, cfg.cache_dir)
        elif cfg.allow_random_init:
            weights = None
            self.random_init = True
        else:
            raise WeightsNotFoundError(
                f"embed.pretrained is not set for {cfg.model}: give a tag from the local cache or a "
                f"checkpoint path (or embed.allow_random_init=true for a smoke test)"
            )
        torch.manual_seed(cfg.seed)  # random init must be identical in every actor
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model = open_clip.create_model(cfg.model, pretrained=weights, device="cpu")
        # from the tag's config, as the decode tasks use: a checkpoint loaded by path would
        # otherwise fall back to the architecture's default mean/std
        self.preprocess = open_clip_preprocess_spec(cfg)
        self.visual = model.visual.eval().to(self.device)
        del model  # the text tower is not needed
        if self.precision == "bf16":
            # bf16 weights, cast once; autocast in _forward keeps LayerNorm/softmax in fp32. Autocast
            # over fp32 weights re-casts the attention weights every call: 2.4x slower on CPU.
            self.visual = self.visual.to(torch.bfloat16)
        self.visual = self.visual.to(memory_format=torch.channels_last)
        self.model_id = model_id_for(cfg)
        with torch.inference_mode():
            probe = torch.zeros(1, 3, self.preprocess.size, self.preprocess.size)
            self.dim = int(self._forward(probe).shape[-1])

    def _forward(self, x):
        import torch

        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        if self.precision == "bf16":
            with torch.autocast(self.device, dtype=torch.bfloat16):
                return self.visual(x.to(torch.bfloat16)).float()
        return self.visual(x).float()

    def embed(self, pixels_uint8: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        if len(pixels_uint8) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode():
            feats = self._forward(normalize(pixels_uint8, self.preprocess, self.device))
            return F.normalize(feats, dim=-1).cpu().numpy().astype(np.float32)


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
    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        if pcfg.hf_hub_id:
            found = try_to_load_from_cache(pcfg.hf_hub_id, filename, cache_dir=cfg.cache_dir)
            if isinstance(found, str):
                return found
            looked.append(f"{pcfg.hf_hub_id}/{filename}")
    raise WeightsNotFoundError(
        f"weights for timm {name} are not on this machine and are never downloaded at run time. "
        f"Looked in the Hugging Face cache for: {'; '.join(looked) or 'nothing (no hub id)'}. Copy the "
        f"cache from a machine with network, or set embed.pretrained to the weights file's path."
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


class TimmEmbedder(Embedder):
    """A timm image model's pooled features (e.g. DINOv2 `vit_small_patch14_dinov2`)."""

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
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if cfg.pretrained:
            weights = _timm_weights(cfg)
            model = timm.create_model(cfg.model, pretrained=True, num_classes=0,
                                      pretrained_cfg_overlay={"file": weights})
        else:
            model = timm.create_model(cfg.model, pretrained=False, num_classes=0)
            self.random_init = True
        self._place(model, timm_preprocess_spec(cfg), model_id_for(cfg))

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


class LocalEmbedder(TimmEmbedder):
    """An encoder checkpoint of our own (`prune/checkpoints.py`): safetensors + JSON, no pickle."""

    def __init__(self, cfg: EmbedConfig, device: Optional[str] = None):
        from .checkpoints import load_encoder, preprocess_of

        self._setup_device(cfg, device)
        model, config = load_encoder(_local_checkpoint(cfg))
        self._place(model, preprocess_of(config), model_id_for(cfg))


def _local_checkpoint(cfg: EmbedConfig) -> str:
    from .checkpoints import read_config

    if not cfg.pretrained:
        raise WeightsNotFoundError("embed.backend=local needs embed.pretrained: the checkpoint directory")
    read_config(cfg.pretrained)  # names the missing file, if any
    return cfg.pretrained


def local_preprocess_spec(cfg: EmbedConfig) -> PreprocessSpec:
    from .checkpoints import preprocess_of, read_config

    return preprocess_of(read_config(_local_checkpoint(cfg)))


BACKENDS = {"open_clip": OpenClipEmbedder, "timm": TimmEmbedder, "local": LocalEmbedder}


WEIGHT_CHECKS = {
    "open_clip": lambda cfg: resolve_open_clip_weights(cfg.model, cfg.pretrained, cfg.cache_dir),
    "timm": _timm_weights,
    "local": _local_checkpoint,
}


def check_weights(cfg: EmbedConfig) -> None:
    """Fail fast, on the driver, when the configured weights are not on this machine."""
    if cfg.pretrained:
        WEIGHT_CHECKS[cfg.backend](cfg)
    elif not cfg.allow_random_init:
        raise WeightsNotFoundError(
            "embed.pretrained is not set: give a tag from the local cache or a weights file "
            "(embed.allow_random_init=true only for smoke tests)"
        )


def make_embedder(cfg: EmbedConfig, device: Optional[str] = None) -> Embedder:
    """The one place that maps `embed.backend` to a class."""
    return BACKENDS[cfg.backend](cfg, device)


def spec_from_open_clip(size, pp: dict) -> PreprocessSpec:
    """open_clip's preprocess dict (and image size, int or pair) -> our PreprocessSpec."""
    return PreprocessSpec(
        size=size if isinstance(size, int) else int(size[0]),
        mean=tuple(pp.get("mean", PreprocessSpec.mean)),
        std=tuple(pp.get("std", PreprocessSpec.std)),
        interpolation=pp.get("interpolation", "bicubic"),
        resize_mode=pp.get("resize_mode", "shortest"),
        fill_color=pp.get("fill_color", 0),
    )


def open_clip_preprocess_spec(cfg: EmbedConfig) -> PreprocessSpec:
    """The eval preprocessing open_clip would build for this model, without building the model.

    The decode tasks need it before any model is loaded; the embed actors check that the
    model they load agrees.
    """
    import open_clip

    model_cfg = open_clip.get_model_config(cfg.model)
    if model_cfg is None:
        raise ValueError(f"embed.model={cfg.model!r} is not an open_clip architecture")
    size = model_cfg.get("vision_cfg", {}).get("image_size", 224)
    pp = dict(model_cfg.get("preprocess_cfg", {}))
    if cfg.pretrained and not os.path.isfile(os.path.expanduser(cfg.pretrained)):
        tag_cfg = open_clip.get_pretrained_cfg(cfg.model, cfg.pretrained) or {}
        pp.update({k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg})
    return spec_from_open_clip(size, pp)


PREPROCESS_SPECS = {
    "open_clip": open_clip_preprocess_spec,
    "timm": timm_preprocess_spec,
    "local": local_preprocess_spec,
}


def preprocess_spec_for(cfg: EmbedConfig) -> PreprocessSpec:
    return PREPROCESS_SPECS[cfg.backend](cfg)
