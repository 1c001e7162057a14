"""The embedder interface, the backend registry, and device/precision choices every backend shares.

An embedder turns a batch of uint8 crops (made by prune/embed/decode.py to its `preprocess` spec)
into L2-normalized float32 vectors. A backend is one class that registers itself under the name
`embed.backend` selects (`@BACKENDS.register`) and carries its own weight check, preprocessing and
model id as class methods, so the driver can check weights and the decode tasks can crop images
before any model is loaded. Weights come from local files, or from a hub once: the driver fetches
what the cache lacks (prune/embed/hub.py, `embed.download`) and the actors load that copy.
"""

from __future__ import annotations

import difflib
import os
from abc import ABC, abstractmethod
from typing import ClassVar, Optional

import numpy as np

from prune.embed.decode import PreprocessSpec
from prune.embed.errors import WeightsNotFoundError
from prune.embed.hub import Fetched, HubFile, HubUnreachable, fetch, locate, offline_by_environment
from prune.embed.settings import EmbedConfig
from prune.settings import ConfigError, Registry


class Embedder(ABC):
    """Batch of uint8 NHWC crops -> float32 [N, dim], each row of unit length."""

    name: ClassVar[str]  # the `embed.backend` that selects this class
    text_tower: ClassVar[bool] = False  # can embed captions (`embed.text`): a CLIP-style model

    model_id: str
    preprocess: PreprocessSpec
    dim: int
    random_init: bool = False
    text_dim: Optional[int] = None  # with embed.text: the caption embeddings' size

    @abstractmethod
    def __init__(self, cfg: EmbedConfig, device: Optional[str] = None): ...

    @abstractmethod
    def embed(self, pixels_uint8: np.ndarray) -> np.ndarray: ...

    def embed_text(self, captions: list[str]) -> np.ndarray:
        """Captions -> float32 [N, text_dim], unit rows, in the image embeddings' space (embed.text)."""
        raise NotImplementedError(f"embed.backend={self.name} has no text tower")

    # --- what the driver and the decode tasks need before any model is loaded ---------------

    @classmethod
    @abstractmethod
    def spec_for(cls, cfg: EmbedConfig) -> PreprocessSpec:
        """The eval crop this model expects (the decode tasks make it; the actor checks it)."""

    @classmethod
    @abstractmethod
    def find_weights(cls, cfg: EmbedConfig) -> str:
        """The local weights `cfg.pretrained` names; WeightsNotFoundError says what is missing."""

    @classmethod
    def hub_files(cls, cfg: EmbedConfig) -> list[HubFile]:
        """The hub files `cfg.pretrained` is made of (a tag's or hub id's); [] for a path or no weights."""
        return []

    @classmethod
    def known_models(cls) -> list[str] | None:
        """The architectures `embed.model` may name (None: the backend does not list them)."""
        return None

    @classmethod
    def id_for(cls, cfg: EmbedConfig) -> str:
        """backend:model:weights, where weights is the tag, the checkpoint's file name or random-init."""
        if cfg.pretrained:
            path = os.path.expanduser(cfg.pretrained)
            tag = os.path.basename(path) if os.path.isfile(path) else cfg.pretrained
        else:
            tag = f"random-init-seed{cfg.seed}"
        return f"{cfg.backend}:{cfg.model}:{tag}"

    def _setup_device(self, cfg: EmbedConfig, device: Optional[str]) -> None:
        """Device, precision and CPU threads, the same way for every backend."""
        import torch

        self.device = resolve_device(device or cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        if cfg.torch_threads and self.device == "cpu":
            torch.set_num_threads(cfg.torch_threads)


BACKENDS: Registry[type[Embedder]] = Registry("embed.backend")


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
    return BACKENDS.get(cfg.backend).id_for(cfg)


def preprocess_spec_for(cfg: EmbedConfig) -> PreprocessSpec:
    return BACKENDS.get(cfg.backend).spec_for(cfg)


def check_weights(cfg: EmbedConfig) -> list[Fetched]:
    """Fail fast, on the driver, when the configured model is unknown or its weights are neither on
    this machine nor fetchable (before Ray starts); fetch them once when they may be. Returns the
    cache files the weights are (for the actors on other nodes), [] for a path or random init."""
    known = BACKENDS.get(cfg.backend).known_models()
    if known is not None and cfg.model not in known:
        close = difflib.get_close_matches(cfg.model, known, n=3, cutoff=0.6)
        guess = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else f" ({len(known)} known)"
        raise ConfigError(f"embed.model {cfg.model!r} is not an architecture of embed.backend={cfg.backend}{guess}")
    if cfg.text and not BACKENDS.get(cfg.backend).text_tower:
        text_backends = [n for n in BACKENDS.names() if BACKENDS.get(n).text_tower]
        raise ConfigError(f"embed.text: embed.backend={cfg.backend} has no text tower to embed captions with; "
                          f"use one that has ({', '.join(text_backends)}), or embed.text=false")
    if cfg.pretrained:
        return _find_or_fetch(BACKENDS.get(cfg.backend), cfg)
    if not cfg.allow_random_init:
        raise WeightsNotFoundError(
            "embed.pretrained is not set: give a tag from the local cache or a weights file "
            "(embed.allow_random_init=true only for smoke tests)"
        )
    return []


def _find_or_fetch(backend: type[Embedder], cfg: EmbedConfig) -> list[Fetched]:
    wanted = backend.hub_files(cfg)
    try:
        backend.find_weights(cfg)
        return locate(wanted, cfg.cache_dir) or []
    except WeightsNotFoundError as missing:
        if not wanted or not downloads_allowed(cfg):
            raise
        try:
            fetched = fetch(wanted, cfg.cache_dir, cfg.hub_endpoint)
        except HubUnreachable as exc:
            if cfg.download == "auto":  # no network: as without downloads, and why
                raise WeightsNotFoundError(f"{missing} (embed.download=auto: {exc})") from None
            raise
    backend.find_weights(cfg)  # the fetched copy is where the backend looks
    return fetched


def downloads_allowed(cfg: EmbedConfig) -> bool:
    """embed.download: true or false; auto: unless the environment says offline (HF_HUB_OFFLINE)."""
    if cfg.download is True and offline_by_environment():
        raise ConfigError("embed.download=true but HF_HUB_OFFLINE is set in this environment; unset one of them")
    return cfg.download is True or (cfg.download == "auto" and not offline_by_environment())


def make_embedder(cfg: EmbedConfig, device: Optional[str] = None) -> Embedder:
    """The one place that maps `embed.backend` to a class."""
    return BACKENDS.get(cfg.backend)(cfg, device)
