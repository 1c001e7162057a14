"""Settings of encoder training: the `train` section of a `train-encoder` config."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator

from prune.settings import Section


class AugmentConfig(Section):
    """Training views: SimCLR's recipe, minus colour for grayscale-like data (set by the config)."""

    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area range
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # and its aspect-ratio range
    hflip: bool = True  # a random horizontal flip
    brightness: float = Field(0.4, ge=0.0)  # jitter strength (0 = off)
    contrast: float = Field(0.4, ge=0.0)  # contrast jitter strength (0 = off)
    saturation: float = Field(0.0, ge=0.0)  # saturation jitter strength (0 = off)
    jitter_prob: float = Field(0.8, ge=0.0, le=1.0)  # chance a view gets the colour jitter
    grayscale_prob: float = Field(0.0, ge=0.0, le=1.0)  # chance a view is turned gray
    blur_prob: float = Field(0.0, ge=0.0, le=1.0)  # chance a view is blurred
    erase_prob: float = Field(0.0, ge=0.0, le=1.0)  # chance a rectangle of a view is erased

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


class TrainConfig(Section):
    """SimCLR (NT-Xent) on a timm backbone; see docs/encoders.md, 'A self-supervised encoder of your own'."""

    architecture: str = "resnet18"  # a timm model name; the checkpoint stores it
    model_kwargs: dict = {}  # passed to timm.create_model (e.g. channels, stem_width)
    image_size: int = Field(32, ge=8)  # the encoder's input crop, in pixels; the checkpoint stores it
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel normalization, stored in the checkpoint
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel normalization, stored in the checkpoint
    interpolation: Literal["bicubic", "bilinear", "nearest", "lanczos"] = "bicubic"  # the eval resize's
    projection_hidden: int = Field(512, ge=1)  # the projection head's hidden width (dropped at export)
    projection_dim: int = Field(128, ge=1)  # the projection the loss compares
    temperature: float = Field(0.2, gt=0.0)  # NT-Xent's temperature
    batch_size: int = Field(256, ge=2)  # per worker; negatives come from all workers' batches
    epochs: int = Field(20, ge=1)  # passes over the shards
    max_steps: Optional[int] = Field(None, ge=1)  # stop early (smoke tests)
    lr: float = Field(2e-3, gt=0.0)  # AdamW, cosine decay after a linear warmup
    weight_decay: float = Field(1e-4, ge=0.0)  # AdamW's
    warmup_steps: int = Field(100, ge=0)  # steps of the linear warm-up
    num_workers: int = Field(2, ge=1)  # Ray Train data-parallel workers
    use_gpu: bool = False  # one GPU per worker on a cluster
    cpus_per_worker: float = Field(1.0, gt=0)  # CPUs each worker reserves
    torch_threads: Optional[int] = Field(None, ge=1)  # intra-op threads per worker (None: torch's choice)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast where the device has native bf16
    cache_decoded: bool = True  # decode once into Ray's object store (small sets); False: stream every epoch
    checkpoint_every_steps: int = Field(500, ge=1)  # and at the end of every epoch
    keep_checkpoints: int = Field(2, ge=1)  # the newest checkpoints Ray Train keeps
    export_dtype: Literal["float32", "float16"] = "float32"  # the exported encoder (float16 halves its size)
    seed: int = 0  # the initial weights, the views and the data order
    augment: AugmentConfig = AugmentConfig()


