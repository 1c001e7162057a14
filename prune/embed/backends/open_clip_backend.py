"""The open_clip backend: the image (and text) tower of any open_clip architecture, weights from the
local cache, a weights file, or a checkpoint directory in open_clip's own layout.

A directory `embed.pretrained` names (or open_clip's spelling of it, `local-dir:DIR`) holds
`open_clip_config.json` (`model_cfg`, `preprocess_cfg`) and its weights
(`open_clip_model.safetensors`), as `ssl-prune train-clip` writes it and as
`open_clip.create_model("local-dir:DIR")` loads it. The architecture is then the directory's
`model_cfg` (embed.model is not read), the crop its `preprocess_cfg`, and the model id names the
weights by content (a sha256 prefix), so fingerprints follow the weights, not the path.
`hf-hub:ORG/REPO` (open_clip's own spelling) names such a directory on a hub: the snapshot the
driver fetched into the Hugging Face cache (prune/embed/hub.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Optional

import numpy as np

from prune.embed.backends.base import BACKENDS, Embedder
from prune.embed.decode import PreprocessSpec, normalize
from prune.embed.errors import WeightsNotFoundError
from prune.embed.hub import HubFile, cache_root
from prune.embed.settings import EmbedConfig
from prune.embed.text import CaptionEncoder

# open_clip's own names (open_clip.constants.HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME) and schema prefix
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"


def open_clip_dir(pretrained: Optional[str], cache_dir: Optional[str] = None) -> Optional[str]:
    """The checkpoint directory `embed.pretrained` names (a directory, `local-dir:DIR`, or the cached
    snapshot of `hf-hub:ORG/REPO`); None for a tag or a weights file."""
    if not pretrained:
        return None
    if pretrained.startswith(HF_HUB):
        from huggingface_hub import try_to_load_from_cache

        repo_id = pretrained.removeprefix(HF_HUB).strip("/")
        found = try_to_load_from_cache(repo_id, OPEN_CLIP_CONFIG, cache_dir=cache_dir)
        if not isinstance(found, str):
            raise WeightsNotFoundError(
                f"embed.pretrained={pretrained!r} is not in the Hugging Face cache ({cache_root(cache_dir)}) "
                f"and was not fetched (embed.download), or set embed.pretrained to a directory or weights file"
            )
        return os.path.dirname(found)
    path = os.path.expanduser(pretrained.removeprefix(LOCAL_DIR))
    return path if pretrained.startswith(LOCAL_DIR) or os.path.isdir(path) else None


def read_open_clip_dir(path: str) -> tuple[dict, str]:
    """(open_clip_config.json, the weights file open_clip loads) of a checkpoint directory;
    WeightsNotFoundError names what is missing, in one line."""
    from pathlib import Path

    from open_clip.factory import _find_checkpoint_in_dir  # the file create_model("local-dir:") picks

    layout = f"an open_clip checkpoint directory holds {OPEN_CLIP_CONFIG} and {OPEN_CLIP_WEIGHTS}"
    if not os.path.isdir(path):
        raise WeightsNotFoundError(f"embed.pretrained: no directory {path!r} ({layout})")
    config_path = os.path.join(path, OPEN_CLIP_CONFIG)
    if not os.path.isfile(config_path):
        raise WeightsNotFoundError(f"embed.pretrained: {path!r} has no {OPEN_CLIP_CONFIG} ({layout})")
    st = os.stat(config_path)
    config = _read_json(config_path, st.st_mtime_ns, st.st_size)
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise WeightsNotFoundError(f"embed.pretrained: {config_path} has no model_cfg ({layout})")
    weights = _find_checkpoint_in_dir(Path(path))
    if weights is None:
        raise WeightsNotFoundError(f"embed.pretrained: {path!r} has {OPEN_CLIP_CONFIG} but no weights ({layout})")
    return config, weights


@functools.lru_cache(maxsize=16)
def _read_json(path: str, _mtime_ns: int, _size: int):
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError as exc:
            raise WeightsNotFoundError(f"embed.pretrained: {path} is not valid JSON ({exc})") from None


def weights_sha256(path: str) -> str:
    """sha256 of a weights file, hashed once per file version (the driver and every actor ask)."""
    st = os.stat(path)
    return _sha256(os.path.realpath(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=16)
def _sha256(path: str, _mtime_ns: int, _size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dir_preprocess_spec(config: dict) -> PreprocessSpec:
    """The eval crop create_model("local-dir:") sets: preprocess_cfg over open_clip's defaults, the
    size the vision tower's."""
    from dataclasses import asdict

    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    pp = merge_preprocess_dict(asdict(PreprocessCfg()), config.get("preprocess_cfg") or {})
    size = config["model_cfg"].get("vision_cfg", {}).get("image_size", pp["size"])
    return spec_from_open_clip(size, pp)


def resolve_open_clip_weights(model: str, pretrained: str, cache_dir: Optional[str]) -> str:
    """A checkpoint path for `pretrained` (a file, or a tag found in the local cache)."""
    import open_clip

    if os.path.isfile(os.path.expanduser(pretrained)):
        return os.path.expanduser(pretrained)
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained not in tags:
        raise WeightsNotFoundError(
            f"embed.pretrained={pretrained!r} is neither a checkpoint file or directory nor a known tag of "
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
        f"weights for {model} tag {pretrained!r} are not on this machine. Looked in: {'; '.join(candidates)}. "
        f"Let the driver fetch them once (embed.download, on where the hub is reachable), copy the checkpoint "
        f"there (huggingface-cli download on a machine with network, then copy the cache), or set "
        f"embed.pretrained to the checkpoint file's path."
    )


@BACKENDS.register
class OpenClipEmbedder(Embedder):
    """The image tower of any `open_clip.list_models()` architecture, or of a checkpoint directory."""

    name = "open_clip"
    text_tower = True

    @classmethod
    def spec_for(cls, cfg: EmbedConfig) -> PreprocessSpec:
        d = open_clip_dir(cfg.pretrained, cfg.cache_dir)
        return dir_preprocess_spec(read_open_clip_dir(d)[0]) if d else open_clip_preprocess_spec(cfg)

    @classmethod
    def find_weights(cls, cfg: EmbedConfig) -> str:
        d = open_clip_dir(cfg.pretrained, cfg.cache_dir)
        return read_open_clip_dir(d)[1] if d else resolve_open_clip_weights(cfg.model, cfg.pretrained, cfg.cache_dir)

    @classmethod
    def hub_files(cls, cfg: EmbedConfig) -> list[HubFile]:
        """hf-hub:ORG/REPO: its open_clip_config.json and weights; a tag: the file its hf_hub names
        (safetensors first, as open_clip loads it); nothing for a path or a tag with only a URL."""
        import open_clip

        pretrained = cfg.pretrained or ""
        weights = (*open_clip.pretrained._get_safe_alternatives(open_clip.pretrained.HF_WEIGHTS_NAME),
                   open_clip.pretrained.HF_WEIGHTS_NAME)
        if pretrained.startswith(HF_HUB):
            repo_id = pretrained.removeprefix(HF_HUB).strip("/")
            return [HubFile(repo_id, (OPEN_CLIP_CONFIG,)), HubFile(repo_id, weights)]
        if not pretrained or os.path.exists(os.path.expanduser(pretrained.removeprefix(LOCAL_DIR))):
            return []
        if pretrained not in open_clip.list_pretrained_tags_by_model(cfg.model):
            return []
        hf_hub = (open_clip.get_pretrained_cfg(cfg.model, pretrained) or {}).get("hf_hub")
        if not hf_hub:
            return []
        repo_id, filename = os.path.split(hf_hub)
        if filename:
            weights = (*open_clip.pretrained._get_safe_alternatives(filename), filename)
        return [HubFile(repo_id, weights)]

    @classmethod
    def id_for(cls, cfg: EmbedConfig) -> str:
        """A directory's weights by content (`open_clip:local-dir:<sha256 prefix>`); else backend:model:tag."""
        d = open_clip_dir(cfg.pretrained, cfg.cache_dir)
        if d is None:
            return super().id_for(cfg)
        return f"{cls.name}:{LOCAL_DIR}{weights_sha256(read_open_clip_dir(d)[1])[:16]}"

    @classmethod
    def known_models(cls) -> list[str]:
        import open_clip

        return open_clip.list_models()

    def __init__(self, cfg: EmbedConfig, device: Optional[str] = None):
        import open_clip
        import torch

        directory = open_clip_dir(cfg.pretrained, cfg.cache_dir)
        if directory is None and cfg.model not in open_clip.list_models():
            raise ValueError(f"embed.model={cfg.model!r} is not an open_clip architecture")
        self._setup_device(cfg, device)
        # the name open_clip builds the model and its tokenizer from: the directory's config, or the architecture
        model_name = LOCAL_DIR + directory if directory else cfg.model
        if directory:
            read_open_clip_dir(directory)  # names what is missing; create_model finds the same weights
            weights = None
        elif cfg.pretrained:
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
        model = open_clip.create_model(model_name, pretrained=weights, device="cpu")
        # from the tag's (or the directory's) config, as the decode tasks use: a checkpoint loaded
        # by path would otherwise fall back to the architecture's default mean/std
        self.preprocess = self.spec_for(cfg)
        self.visual = model.visual.eval().to(self.device)
        self.captions = None
        if cfg.text:  # the text tower too, in the same actor (the captions ride in the image batches)
            model.visual = torch.nn.Identity()
            self.captions = CaptionEncoder(model.eval().to(self.device), model_name, self.device, self.precision)
        del model
        if self.precision == "bf16":
            # bf16 weights, cast once; autocast in _forward keeps LayerNorm/softmax in fp32. Autocast
            # over fp32 weights re-casts the attention weights every call: 2.4x slower on CPU.
            self.visual = self.visual.to(torch.bfloat16)
            if self.captions is not None:
                self.captions.model = self.captions.model.to(torch.bfloat16)
        self.visual = self.visual.to(memory_format=torch.channels_last)
        self.model_id = self.id_for(cfg)
        with torch.inference_mode():
            probe = torch.zeros(1, 3, self.preprocess.size, self.preprocess.size)
            self.dim = int(self._forward(probe).shape[-1])
        if self.captions is not None:
            self.text_dim = int(self.captions.encode(["a"]).shape[-1])

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


    def embed_text(self, captions: list[str]) -> np.ndarray:
        if self.captions is None:
            raise RuntimeError("the text tower was not loaded: embed.text is false")
        if not captions:
            return np.zeros((0, self.text_dim), dtype=np.float32)
        return self.captions.encode(list(captions))


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
