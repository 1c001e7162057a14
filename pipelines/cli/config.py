"""The configs of the CLI verbs: each composes the settings sections of its stages, from YAML + overrides.

OmegaConf merges the YAML file with `key=value` overrides; pydantic validates the result so an
unknown key or a bad value fails fast with one message that names the key. A stage registered
beyond the shipped ones (pipelines/stage.py) brings its own section: `validate_config` adds it.
"""

from __future__ import annotations

import difflib
import os
from typing import Annotated, ClassVar, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import AfterValidator, BaseModel, ValidationError, create_model, field_validator, model_validator
from pydantic_core import PydanticCustomError

from pipelines.runtime import RayConfig
from pipelines.shipped import config_path, shipped_configs, shipped_dir
from pipelines.stage import STAGES, Stage, check_order
from pipelines.stages import RUN_STAGES
from prune import schema
from prune.cluster.settings import KMeansConfig
from prune.dedup.settings import DedupConfig
from prune.embed.backends import BACKENDS
from prune.embed.settings import DecodeConfig, EmbedConfig
from prune.evaluate.settings import EvaluateSection
from prune.io.settings import WriteConfig
from prune.select.settings import SelectConfig
from prune.settings import ConfigError, Extensions, NonEmptyStr, Section
from prune.train.clip_settings import ClipModelConfig, ClipTrainConfig
from prune.train.settings import TrainConfig


class JobConfig(Section):
    """What every command's config has: where outputs go, which members are images, Ray, decoding."""

    output: NonEmptyStr  # the output directory: a local path or any fsspec URL (s3://bucket/pruned)
    # a sample's image is its first member with one of these extensions (any case; the dot optional)
    image_extensions: Extensions = list(schema.IMAGE_EXTENSIONS_DEFAULT)
    ray: RayConfig = RayConfig()
    # decoding in Ray Data CPU tasks: each image to the model's eval crop as uint8, before the actors
    decode: DecodeConfig = DecodeConfig()


def _registered_backend(embed: EmbedConfig) -> EmbedConfig:
    """`embed.backend` must be a registered backend; an unknown name lists the known ones."""
    try:
        BACKENDS.check(embed.backend)
    except ValueError as exc:
        raise PydanticCustomError("unknown_backend", str(exc), {"key": "backend"}) from None
    return embed


RegisteredEmbed = Annotated[EmbedConfig, AfterValidator(_registered_backend)]


class RunConfig(JobConfig):
    """`ssl-prune run`: the stages to run, in order, and each stage's section."""

    # tar shards: a directory, a glob or a brace pattern, local or any fsspec URL; optional when the
    # first stage brings its own units of work (import)
    input: Optional[NonEmptyStr] = None
    stages: list[str] = list(RUN_STAGES)  # the stages to run, in order: registered names (pipelines/stages/)
    # the model every image (and, with `text`, every caption) is embedded with, and its actors
    embed: RegisteredEmbed = EmbedConfig()
    kmeans: KMeansConfig = KMeansConfig()
    dedup: DedupConfig = DedupConfig()  # used when `stages` lists dedup
    select: SelectConfig = SelectConfig()
    write: WriteConfig = WriteConfig()

    @field_validator("stages")
    @classmethod
    def _registered(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name at least one stage")
        names = [STAGES.check(name) for name in value]
        check_order([STAGES.get(name) for name in names])
        return names

    @model_validator(mode="after")
    def _has_input(self):
        if self.input is None and STAGES.get(self.stages[0]).input_shards is Stage.input_shards:
            raise PydanticCustomError("missing", "missing", {"key": "input"})
        tars = [name for name in self.stages if STAGES.get(name).reads_tars]
        if self.input is None and tars:
            raise PydanticCustomError("no_tars", f"the {tars[0]} stage reads tar shards: give `input`, or leave "
                                                  f"'{tars[0]}' out of the stages", {"key": "stages"})
        if "clip_score" in self.stages and "embed" in self.stages and not self.embed.text:
            raise PydanticCustomError("no_scores", "the clip_score stage reads the captions' scores the embed stage "
                                                   "records with embed.text=true (a backend with a text tower, e.g. "
                                                   "open_clip); set it, or leave clip_score out of the stages",
                                      {"key": "embed.text"})
        return self

    def stage_list(self) -> list[Stage]:
        """The configured stages, each built from the sections its fields name."""
        return [STAGES.get(name).from_config(self) for name in self.stages]


class LocalOutputJob(JobConfig):
    """A job whose output is a checkpoint directory of files (`_why_local` says whose)."""

    _why_local: ClassVar[str] = "the checkpoint is files"

    @field_validator("output")
    @classmethod
    def _local(cls, value: str) -> str:
        if "://" in value and not value.startswith("file://"):
            raise ValueError(f"must be a local (or shared) directory: {cls._why_local}")
        return value


class TrainEncoderConfig(LocalOutputJob):
    """`ssl-prune train-encoder`: shards in, an encoder checkpoint directory out.

    `output` is the checkpoint directory (encoder.safetensors + encoder.json) and Ray Train's state.
    """

    _why_local: ClassVar[str] = "Ray Train and the exported encoder are files"
    input: NonEmptyStr  # the unlabeled tar shards to train on: a directory, glob or brace pattern
    train: TrainConfig = TrainConfig()


class TrainClipConfig(LocalOutputJob):
    """`ssl-prune train-clip`: image-caption shards in, a CLIP checkpoint directory out.

    `output` is the directory open_clip loads (`create_model("local-dir:OUTPUT")`) and the open_clip
    backend embeds with (`embed.pretrained=OUTPUT`).
    """

    _why_local: ClassVar[str] = "the checkpoint is files open_clip reads"
    input: NonEmptyStr  # image-caption tar shards (the caption: each sample's .txt, else the parquet's column)
    model: ClipModelConfig = ClipModelConfig()  # open_clip's model_cfg (and preprocess_cfg), typed
    train: ClipTrainConfig = ClipTrainConfig()


class EvaluateConfig(JobConfig):
    """`ssl-prune evaluate`: accuracy of classifiers trained on pruned subsets of a labeled set."""

    train_input: NonEmptyStr  # labeled shards: the pool that is pruned
    test_input: NonEmptyStr  # labeled shards: never pruned, only scored against
    embed: RegisteredEmbed = EmbedConfig()  # the model the pool and the test shards are embedded with
    kmeans: KMeansConfig = KMeansConfig()
    evaluate: EvaluateSection = EvaluateSection()


_EXTENDED: dict[tuple, type[RunConfig]] = {}


def run_config_model(shipped_only: bool = False) -> type[RunConfig]:
    """RunConfig plus a section for every registered stage whose section it lacks (`shipped_only`:
    only the stages ssl-prune ships, in pipelines/stages/, not a plugin's or a test's)."""
    extra = {}
    for name in STAGES.names():
        stage = STAGES.get(name)
        if shipped_only and not stage.__module__.startswith("pipelines.stages."):
            continue
        for key, (model, default) in stage.sections().items():
            if key not in RunConfig.model_fields and key not in extra:
                extra[key] = (model, default)
    if not extra:
        return RunConfig
    key = tuple(sorted((k, m) for k, (m, _) in extra.items()))
    if key not in _EXTENDED:
        _EXTENDED[key] = create_model("RunConfig", __base__=RunConfig, **extra)
    return _EXTENDED[key]


def _section_keys(model: type[BaseModel], path: list) -> list[str]:
    """The keys the section at `path` of `model` accepts (empty when the path leaves the models)."""
    for part in path:
        field = model.model_fields.get(str(part)) if isinstance(model, type) else None
        annotation = getattr(field, "annotation", None)  # pydantic keeps Annotated's metadata apart
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _did_you_mean(model: type[BaseModel], loc: list) -> str:
    """', did you mean 'select.policy'?' for a misspelt key, when a known key is close."""
    close = difflib.get_close_matches(str(loc[-1]), _section_keys(model, loc[:-1]), n=1, cutoff=0.6)
    return f"; did you mean '{'.'.join(str(p) for p in [*loc[:-1], close[0]])}'?" if close else ""


def _format_validation_error(err: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for e in err.errors():
        loc = [*e["loc"], *([e["ctx"]["key"]] if "key" in (e.get("ctx") or {}) else [])]  # a field a section validator names
        key = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown config key '{key}'{_did_you_mean(model, loc)}")
        elif e["type"] == "missing":
            lines.append(f"missing config key '{key}'")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e["input"].get(e["ctx"]["key"]) if isinstance(e.get("input"), dict) and "key" in (e.get("ctx") or {}) \
                else e.get("input")
            lines.append(f"bad value for '{key}': {msg} (got {got!r})")
    return "; ".join(lines)


def _local_checkpoint(value, config_dir: Optional[str]):
    """`embed.pretrained` as a path that exists: as written when it exists from the current
    directory (the value, and so the embed fingerprint, unchanged), else against the config file's
    folder (a value from the file), else among the shipped models (`models/fmnist-simclr` from
    anywhere); anything else (an open_clip tag, a missing path the backend will name) is left as is."""
    if not isinstance(value, str) or not value or os.path.isabs(value) or "://" in value or os.path.exists(value):
        return value
    candidates = [os.path.join(config_dir, value)] if config_dir is not None else []
    models = shipped_dir("models")
    if models:
        candidates.append(os.path.join(models, value.removeprefix("models/")))
    found = next((c for c in candidates if os.path.exists(c)), None)
    return os.path.abspath(found) if found else value


def load_config(path: Optional[str], overrides: list[str] = (), model: type[BaseModel] = RunConfig,
                base_dict: Optional[dict] = None):
    """Merge a YAML file (or nothing, or `base_dict`: a config as a manifest records it) with dotted
    `key=value` overrides and validate.

    `path` is a file or the name of a shipped config (`demo`, `laion`, ...). A local checkpoint the
    file names (`embed.pretrained`) is found from the current directory, else the file's folder,
    else the shipped models; input and output paths are relative to the current directory.
    """
    for item in overrides:
        if "=" not in item or not item.partition("=")[0].strip():
            raise ConfigError(f"override '{item}' is not of the form key=value")
    path = config_path(path) if path else path
    try:
        base = OmegaConf.load(path) if path else OmegaConf.create(base_dict or {})
        if not isinstance(base, DictConfig):  # a list or a scalar cannot take dotted overrides
            raise ConfigError(f"config {path} must be a mapping at the top level")
        overrides_cfg = OmegaConf.from_dotlist(list(overrides))
        merged = OmegaConf.merge(base, overrides_cfg)
        raw = OmegaConf.to_container(merged, resolve=True)
        if isinstance(raw.get("embed"), dict) and "pretrained" in raw["embed"]:
            from_file = OmegaConf.select(overrides_cfg, "embed.pretrained", default=None) is None
            raw["embed"]["pretrained"] = _local_checkpoint(
                raw["embed"]["pretrained"], os.path.dirname(os.path.abspath(path)) if path and from_file else None)
    except FileNotFoundError as exc:
        shipped = ", ".join(shipped_configs())
        raise ConfigError(f"config file not found: {path} (shipped configs, by name: {shipped})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot read config: {exc}") from exc
    return validate_config(raw, model)


def validate_config(raw: dict, model: type[BaseModel] = RunConfig):
    if model is RunConfig:
        model = run_config_model()
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, model)) from None
