"""Settings of CLIP training: the `model` and `train` sections of a `train-clip` config.

`model` is open_clip's own model config (`model_cfg` in open_clip_config.json), typed so that a bad
value is one error naming its key: the trained directory loads with
`open_clip.create_model("local-dir:DIR")` and with `embed.backend=open_clip embed.pretrained=DIR`.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field, model_validator

from prune.settings import PLACEMENT, Section
from prune.train.settings import AugmentConfig


class VisionTower(Section):
    """open_clip's CLIPVisionCfg: a ViT over `image_size` crops cut in `patch_size` patches."""

    image_size: int = Field(32, ge=8)  # the input crop, in pixels
    patch_size: int = Field(4, ge=1)  # patches, in pixels (divides image_size)
    width: int = Field(128, ge=8)  # the transformer's width
    layers: int = Field(4, ge=1)  # transformer blocks
    head_width: int = Field(32, ge=8)  # heads = width / head_width
    mlp_ratio: float = Field(4.0, gt=0)  # each block's MLP width over `width`

    @model_validator(mode="after")
    def _fits(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} must divide image_size {self.image_size}")
        if self.width % self.head_width:
            raise ValueError(f"head_width {self.head_width} must divide width {self.width}")
        return self


class TextTower(Section):
    """open_clip's CLIPTextCfg with its default tokenizer (SimpleTokenizer, CLIP's BPE vocabulary)."""

    context_length: int = Field(32, ge=4, le=77)  # tokens, start and end of text included; longer captions are cut
    width: int = Field(128, ge=8)  # the transformer's width
    heads: int = Field(4, ge=1)  # attention heads (divides width)
    layers: int = Field(4, ge=1)  # transformer blocks
    mlp_ratio: float = Field(4.0, gt=0)  # each block's MLP width over `width`

    @model_validator(mode="after")
    def _fits(self):
        if self.width % self.heads:
            raise ValueError(f"heads {self.heads} must divide width {self.width}")
        return self


class ClipModelConfig(Section):
    """A small open_clip CLIP: the two towers, the shared embedding size and the eval preprocessing."""

    embed_dim: int = Field(128, ge=8)  # the shared image-text embedding
    vision: VisionTower = VisionTower()
    text: TextTower = TextTower()
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel normalization (open_clip's preprocess_cfg)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel normalization (open_clip's preprocess_cfg)
    interpolation: Literal["bicubic", "bilinear", "nearest", "lanczos"] = "bicubic"  # the eval resize's
    # open_clip's resize_mode: shortest side to the size then a centre crop, longest side then pad, or squash
    resize_mode: Literal["shortest", "longest", "squash"] = "shortest"

    def model_cfg(self) -> dict:
        """open_clip's model_cfg: what `open_clip.CLIP(**model_cfg)` and `create_model` build."""
        v, t = self.vision, self.text
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {"image_size": v.image_size, "patch_size": v.patch_size, "width": v.width,
                           "layers": v.layers, "head_width": v.head_width, "mlp_ratio": v.mlp_ratio},
            "text_cfg": {"context_length": t.context_length, "width": t.width, "heads": t.heads,
                         "layers": t.layers, "mlp_ratio": t.mlp_ratio},
        }

    def preprocess_cfg(self) -> dict:
        """open_clip's preprocess_cfg (the eval crop: the decode tasks make it, training sees it)."""
        return {"size": self.vision.image_size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "resize_mode": self.resize_mode}


class ClipTrainConfig(Section):
    """CLIP's contrastive loss (open_clip.ClipLoss, learnable temperature) in one process (docs/encoders.md,
    "A CLIP of your own", says why)."""

    caption_column: str = "caption"  # the caption: the .txt member, else this column of the parquet beside the tar
    batch_size: int = Field(256, ge=2)  # pairs per step: each caption's negatives are the batch's other images
    epochs: int = Field(10, ge=1)  # passes over the image-caption pairs
    max_steps: Optional[int] = Field(None, ge=1)  # stop early (smoke tests)
    lr: float = Field(1e-3, gt=0.0)  # AdamW (CLIP's betas), cosine decay after a linear warm-up
    weight_decay: float = Field(0.1, ge=0.0)  # not on gains, biases, norms or the logit scale (open_clip's rule)
    warmup_steps: int = Field(100, ge=0)  # steps of the linear warm-up
    init_logit_scale: float = Field(2.659, ge=0.0)  # log(1 / 0.07), CLIP's; learned, clamped to log(100)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast where the device has native bf16
    use_gpu: bool = False  # the training task asks Ray for one GPU
    num_cpus: Annotated[float, PLACEMENT] = Field(2.0, gt=0)  # the training task's CPUs
    torch_threads: Annotated[Optional[int], PLACEMENT] = Field(None, ge=1)  # default: num_cpus
    export_dtype: Literal["float32", "float16"] = "float16"  # the saved weights
    # the token-embedding rows of the 49,408-token vocabulary no training caption used keep their
    # random init, which means nothing: saved as zeros, the file compresses (git, wheels) to a fraction
    zero_unused_tokens: bool = True
    seed: int = 0  # the initial weights, the views and the data order
    augment: AugmentConfig = AugmentConfig(crop_scale=(0.8, 1.0), hflip=True, brightness=0.0, contrast=0.0,
                                           jitter_prob=0.0)
