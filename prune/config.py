"""Run configuration: YAML + dotted overrides, validated before any work starts.

OmegaConf merges the YAML file with `key=value` overrides; pydantic validates the result
so an unknown key or a bad value fails fast with one message that names the key.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import schema


class ConfigError(ValueError):
    """A config problem, with a message that names the key at fault."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(_Section):
    address: Optional[str] = None  # None: RAY_ADDRESS, then a running cluster, then a new local one
    num_cpus: Optional[int] = Field(None, ge=1)  # only for a new local cluster
    object_store_memory: Optional[int] = Field(None, ge=78_643_200)


class DecodeConfig(_Section):
    batch_size: int = Field(256, ge=1)
    draft: bool = True  # JPEG draft decoding down to (at least) the model's input size
    max_image_pixels: int = Field(89_478_485, ge=1)  # PIL's own default bomb threshold
    num_cpus: float = Field(1.0, gt=0)


class EmbedConfig(_Section):
    backend: Literal["open_clip", "timm", "local"] = "open_clip"
    model: str = "ViT-B-32"
    pretrained: Optional[str] = None  # a tag from the local cache, or a checkpoint file path
    allow_random_init: bool = False  # only for tests and smoke runs; recorded in the manifest
    cache_dir: Optional[str] = None  # where pretrained tags are looked up (default: open_clip/HF cache)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    batch_size: int = Field(64, ge=1)
    concurrency: int = Field(1, ge=1)  # embed actors; one GPU each on a GPU cluster
    num_cpus_per_actor: float = Field(1.0, gt=0)
    torch_threads: Optional[int] = Field(None, ge=1)  # CPU actors: intra-op threads
    shards_per_round: int = Field(64, ge=1)  # a crash loses at most one round of embedding
    seed: int = 0  # random-init weights


class KMeansConfig(_Section):
    k: Optional[int] = Field(None, ge=1)  # None: n_ok / 10_000 clamped to [10, 100_000]
    sample_size: int = Field(200_000, ge=1)
    niter: int = Field(25, ge=1)
    nredo: int = Field(1, ge=1)
    seed: int = 0
    assign_concurrency: int = Field(2, ge=1)


class SelectConfig(_Section):
    keep_fraction: float = Field(0.7, gt=0.0, le=1.0)
    policy: Literal["hard", "easy", "random"] = "hard"
    balanced: bool = False  # apply the policy within each cluster instead of globally
    seed: int = 0


class WriteConfig(_Section):
    samples_per_shard: int = Field(1000, ge=1)
    band_step: float = Field(0.1, gt=0.0, le=1.0)  # pruned shards come in bands of this keep fraction


class RunConfig(_Section):
    input: str
    output: str
    image_extensions: list[str] = list(schema.IMAGE_EXTENSIONS_DEFAULT)
    ray: RayConfig = RayConfig()
    decode: DecodeConfig = DecodeConfig()
    embed: EmbedConfig = EmbedConfig()
    kmeans: KMeansConfig = KMeansConfig()
    select: SelectConfig = SelectConfig()
    write: WriteConfig = WriteConfig()

    @field_validator("input", "output")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("image_extensions")
    @classmethod
    def _extensions(cls, value: list[str]) -> list[str]:
        cleaned = [v.lower().lstrip(".") for v in value]
        if not cleaned or any(not v or "/" in v for v in cleaned):
            raise ValueError("must be a non-empty list of extensions such as jpg, png")
        return cleaned

    @model_validator(mode="after")
    def _no_random_init_with_weights(self) -> "RunConfig":
        if self.embed.allow_random_init and self.embed.pretrained:
            raise ValueError("embed.allow_random_init and embed.pretrained exclude each other")
        return self


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown config key '{key}'")
        elif e["type"] == "missing":
            lines.append(f"missing config key '{key}'")
        else:
            lines.append(f"bad value for '{key}': {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def load_config(path: Optional[str], overrides: list[str] = ()) -> RunConfig:
    """Merge a YAML file (or nothing) with dotted `key=value` overrides and validate."""
    for item in overrides:
        if "=" not in item or not item.partition("=")[0].strip():
            raise ConfigError(f"override '{item}' is not of the form key=value")
    try:
        base = OmegaConf.load(path) if path else OmegaConf.create({})
        if not isinstance(base, DictConfig):  # a list or a scalar cannot take dotted overrides
            raise ConfigError(f"config {path} must be a mapping at the top level")
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
        raw = OmegaConf.to_container(merged, resolve=True)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot read config: {exc}") from exc
    return validate_config(raw)


def validate_config(raw: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def fingerprint(*parts) -> str:
    """A short stable hash of config sections: what a stage's outputs were made with."""
    blob = json.dumps(
        [p.model_dump() if isinstance(p, BaseModel) else p for p in parts], sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
