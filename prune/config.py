"""Run configuration: YAML + dotted overrides, validated before any work starts.

OmegaConf merges the YAML file with `key=value` overrides; pydantic validates the result
so an unknown key or a bad value fails fast with one message that names the key.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import schema


class ConfigError(ValueError):
    """A config problem, with a message that names the key at fault."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _not_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _clean_extensions(value: list[str]) -> list[str]:
    cleaned = [v.lower().lstrip(".") for v in value]
    if not cleaned or any(not v or "/" in v for v in cleaned):
        raise ValueError("must be a non-empty list of extensions such as jpg, png")
    return cleaned


NonEmptyStr = Annotated[str, AfterValidator(_not_empty)]
Extensions = Annotated[list[str], AfterValidator(_clean_extensions)]


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

    @model_validator(mode="after")
    def _no_random_init_with_weights(self) -> "EmbedConfig":
        if self.allow_random_init and self.pretrained:
            raise ValueError("embed.allow_random_init and embed.pretrained exclude each other")
        return self


class KMeansConfig(_Section):
    """A faiss fit on a sample, optionally refined by distributed Lloyd passes over every embedding."""

    k: Optional[int] = Field(None, ge=1)  # None: n_ok / 10_000 clamped to [10, 100_000]
    sample_size: int = Field(200_000, ge=1)
    niter: int = Field(25, ge=1)  # Lloyd iterations of the sample fit
    nredo: int = Field(1, ge=1)
    seed: int = 0
    init: Literal["random", "kmeans++"] = "random"  # sample fit seeded by random points (faiss) or k-means++
    fit_num_cpus: Optional[int] = Field(None, ge=1)  # None: fit on the driver; n: in a Ray task with n CPUs
    refine_iters: int = Field(0, ge=0)  # Lloyd passes over all embeddings after the sample fit (0: off)
    refine_tol: float = Field(1e-4, ge=0.0)  # stop when the objective changes by at most this, relatively
    refine_shards_per_task: int = Field(1, ge=1)  # shards one refinement task reduces before returning
    assign_concurrency: int = Field(2, ge=1)


class SelectConfig(_Section):
    keep_fraction: float = Field(0.7, gt=0.0, le=1.0)
    policy: Literal["hard", "easy", "random"] = "hard"
    balanced: bool = False  # apply the policy within each cluster instead of globally
    seed: int = 0


class WriteConfig(_Section):
    samples_per_shard: int = Field(1000, ge=1)
    band_step: float = Field(0.1, gt=0.0, le=1.0)  # pruned shards come in bands of this keep fraction


class JobConfig(_Section):
    """What every command's config has: where outputs go, which members are images, Ray, decoding."""

    output: NonEmptyStr
    image_extensions: Extensions = list(schema.IMAGE_EXTENSIONS_DEFAULT)
    ray: RayConfig = RayConfig()
    decode: DecodeConfig = DecodeConfig()


class RunConfig(JobConfig):
    input: NonEmptyStr
    embed: EmbedConfig = EmbedConfig()
    kmeans: KMeansConfig = KMeansConfig()
    select: SelectConfig = SelectConfig()
    write: WriteConfig = WriteConfig()


class AugmentConfig(_Section):
    """Training views: SimCLR's recipe, minus colour for grayscale-like data (set by the config)."""

    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area range
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # and its aspect-ratio range
    hflip: bool = True
    brightness: float = Field(0.4, ge=0.0)  # jitter strength (0 = off)
    contrast: float = Field(0.4, ge=0.0)
    saturation: float = Field(0.0, ge=0.0)
    jitter_prob: float = Field(0.8, ge=0.0, le=1.0)
    grayscale_prob: float = Field(0.0, ge=0.0, le=1.0)
    blur_prob: float = Field(0.0, ge=0.0, le=1.0)
    erase_prob: float = Field(0.0, ge=0.0, le=1.0)

    @field_validator("crop_scale")
    @classmethod
    def _scale(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < value[0] <= value[1] <= 1.0:
            raise ValueError("must be [low, high] with 0 < low <= high <= 1")
        return value

    @field_validator("crop_ratio")
    @classmethod
    def _ratio(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < value[0] <= value[1]:
            raise ValueError("must be [low, high] with 0 < low <= high")
        return value


class TrainConfig(_Section):
    """SimCLR (NT-Xent) on a timm backbone; see README, 'Training an encoder'."""

    architecture: str = "resnet18"  # a timm model name; the checkpoint stores it
    model_kwargs: dict = {}  # passed to timm.create_model (e.g. channels, stem_width)
    image_size: int = Field(32, ge=8)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: Literal["bicubic", "bilinear", "nearest", "lanczos"] = "bicubic"
    projection_hidden: int = Field(512, ge=1)
    projection_dim: int = Field(128, ge=1)
    temperature: float = Field(0.2, gt=0.0)
    batch_size: int = Field(256, ge=2)  # per worker; negatives come from all workers' batches
    epochs: int = Field(20, ge=1)
    max_steps: Optional[int] = Field(None, ge=1)  # stop early (smoke tests)
    lr: float = Field(2e-3, gt=0.0)  # AdamW, cosine decay after a linear warmup
    weight_decay: float = Field(1e-4, ge=0.0)
    warmup_steps: int = Field(100, ge=0)
    num_workers: int = Field(2, ge=1)  # Ray Train data-parallel workers
    use_gpu: bool = False  # one GPU per worker on a cluster
    cpus_per_worker: float = Field(1.0, gt=0)
    torch_threads: Optional[int] = Field(None, ge=1)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast where the device has native bf16
    cache_decoded: bool = True  # decode once into Ray's object store (small sets); False: stream every epoch
    checkpoint_every_steps: int = Field(500, ge=1)  # and at the end of every epoch
    keep_checkpoints: int = Field(2, ge=1)
    export_dtype: Literal["float32", "float16"] = "float32"  # the exported encoder (float16 halves its size)
    seed: int = 0
    augment: AugmentConfig = AugmentConfig()


class TrainEncoderConfig(JobConfig):
    """`ssl-prune train-encoder`: shards in, an encoder checkpoint directory out.

    `output` is the checkpoint directory (encoder.safetensors + encoder.json) and Ray Train's state.
    """

    input: NonEmptyStr
    train: TrainConfig = TrainConfig()


EVAL_POLICIES = ("hard", "easy", "random", "balanced-hard", "balanced-easy", "balanced-random")


class LinearProbeConfig(_Section):
    """Regularized multinomial logistic regression, solved to convergence (prune/probes.py)."""

    weight_decay: float = Field(1e-4, ge=0.0)  # L2 penalty on the weights
    max_iter: int = Field(300, ge=1)  # L-BFGS iterations


class CnnConfig(_Section):
    epochs: int = Field(5, ge=1)
    min_steps: int = Field(200, ge=0)  # small subsets still get this many steps
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0.0)
    width: int = Field(32, ge=1)
    image_size: int = Field(28, ge=8)
    augment: bool = True  # a random 2-pixel shift and horizontal flip per image


class EvaluateSection(_Section):
    keep_fractions: list[float] = [0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0]
    policies: list[Literal[EVAL_POLICIES]] = ["hard", "easy", "random", "balanced-hard", "balanced-easy"]
    seeds: list[int] = [0, 1, 2]
    classifiers: list[Literal["linear", "cnn"]] = ["linear", "cnn"]
    pool_size: Optional[int] = Field(None, ge=1)  # a random subset of the train shards (None: all)
    pool_seed: int = 0
    label_field: str = "label"  # key in each sample's .json member
    concurrency: int = Field(2, ge=1)  # classifier trainings running at once (Ray tasks)
    linear: LinearProbeConfig = LinearProbeConfig()
    cnn: CnnConfig = CnnConfig()

    @field_validator("keep_fractions")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if not value or any(not 0.0 < f <= 1.0 for f in value):
            raise ValueError("must be a non-empty list of fractions in (0, 1]")
        return sorted(set(value))


class EvaluateConfig(JobConfig):
    """`ssl-prune evaluate`: accuracy of classifiers trained on pruned subsets of a labeled set."""

    train_input: NonEmptyStr  # labeled shards: the pool that is pruned
    test_input: NonEmptyStr  # labeled shards: never pruned, only scored against
    embed: EmbedConfig = EmbedConfig()
    kmeans: KMeansConfig = KMeansConfig()
    evaluate: EvaluateSection = EvaluateSection()


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


def load_config(path: Optional[str], overrides: list[str] = (), model: type[BaseModel] = RunConfig):
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
    return validate_config(raw, model)


def validate_config(raw: dict, model: type[BaseModel] = RunConfig):
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def fingerprint(*parts) -> str:
    """A short stable hash of config sections: what a stage's outputs were made with."""
    blob = json.dumps(
        [p.model_dump() if isinstance(p, BaseModel) else p for p in parts], sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
