"""Encoder checkpoints: safetensors weights plus a JSON config, never pickle.

A checkpoint is a directory with `encoder.safetensors` and `encoder.json`. The JSON names a
timm architecture (and its keyword arguments) and the eval preprocessing, so the embed stage
can rebuild the model and decode images for it without any code from the run that trained it.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
from dataclasses import asdict
from typing import Any

from prune.embed.decode import PreprocessSpec
from prune.embed.errors import WeightsNotFoundError

WEIGHTS_FILE = "encoder.safetensors"
CONFIG_FILE = "encoder.json"
FORMAT_VERSION = 1
# what save_encoder itself writes; anything else in encoder.json is the caller's `extra`
CORE_KEYS = ("format_version", "architecture", "model_kwargs", "embed_dim", "preprocess", "weights_sha256")


class CheckpointError(WeightsNotFoundError):
    """A checkpoint directory that is missing a file or holds something else."""


def checkpoint_dir(path: str) -> str:
    """Accept the directory itself or either of its two files."""
    path = os.path.expanduser(path)
    return os.path.dirname(path) if os.path.basename(path) in (WEIGHTS_FILE, CONFIG_FILE) else path


def build_model(architecture: str, model_kwargs: dict[str, Any]):
    """The bare encoder: a timm model with no classifier head (pooled features out)."""
    import timm

    from prune.embed import models  # noqa: F401  (registers our small-image architectures with timm)

    return timm.create_model(architecture, pretrained=False, num_classes=0, **model_kwargs)


def save_encoder(path: str, model, architecture: str, model_kwargs: dict, spec: PreprocessSpec, extra: dict | None = None) -> str:
    """Write weights then config (the config last: its presence marks a complete checkpoint)."""
    os.makedirs(path, exist_ok=True)
    save_tensors(os.path.join(path, WEIGHTS_FILE), model.state_dict())
    config = {
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "model_kwargs": model_kwargs,
        "embed_dim": int(model.num_features),
        "preprocess": asdict(spec),
        "weights_sha256": file_sha256(os.path.join(path, WEIGHTS_FILE)),
        **(extra or {}),
    }
    tmp = os.path.join(path, f".{CONFIG_FILE}.tmp")
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(path, CONFIG_FILE))
    return path


def read_config(path: str) -> dict:
    """The checkpoint's encoder.json, checked; read once per file version (many callers ask)."""
    d = checkpoint_dir(path)
    cfg_path, w_path = os.path.join(d, CONFIG_FILE), os.path.join(d, WEIGHTS_FILE)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise CheckpointError(f"encoder checkpoint {d!r} has no {os.path.basename(p)} (expected {CONFIG_FILE} + {WEIGHTS_FILE})")
    st = os.stat(cfg_path)
    return copy.deepcopy(_read_config(cfg_path, st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=16)
def _read_config(cfg_path: str, _mtime_ns: int, _size: int) -> dict:
    with open(cfg_path) as f:
        config = json.load(f)
    if config.get("format_version") != FORMAT_VERSION or "architecture" not in config:
        raise CheckpointError(f"{cfg_path} is not an ssl-prune encoder config (format_version {FORMAT_VERSION})")
    return config


def preprocess_of(config: dict) -> PreprocessSpec:
    p = dict(config["preprocess"])
    p["mean"], p["std"] = tuple(p["mean"]), tuple(p["std"])
    return PreprocessSpec(**p)


def extra_of(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in CORE_KEYS}


def load_encoder(path: str):
    """-> (model in eval mode, config dict); the weights must match the architecture exactly."""
    from safetensors.torch import load_file

    config = read_config(path)
    weights = os.path.join(checkpoint_dir(path), WEIGHTS_FILE)
    if config.get("weights_sha256") and file_sha256(weights) != config["weights_sha256"]:
        raise CheckpointError(f"{weights} does not match the sha256 in its {CONFIG_FILE}: a partial copy, or another model's weights")
    model = build_model(config["architecture"], config.get("model_kwargs", {}))
    state = load_file(weights)
    model.load_state_dict(state, strict=True)
    return model.eval(), config


def save_tensors(path: str, tensors: dict) -> None:
    """safetensors file written under a temporary name, then renamed."""
    from safetensors.torch import save_file

    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def optimizer_tensors(optimizer) -> tuple[dict, list]:
    """An optimizer's state as flat tensors ("<param index>.<name>") + its JSON-able param groups."""
    import torch

    state = optimizer.state_dict()
    tensors = {
        f"{idx}.{name}": value if torch.is_tensor(value) else torch.tensor(value)
        for idx, entry in state["state"].items()
        for name, value in entry.items()
    }
    return tensors, state["param_groups"]


def load_optimizer(optimizer, tensors: dict, param_groups: list) -> None:
    """The inverse of `optimizer_tensors`."""
    state: dict = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
