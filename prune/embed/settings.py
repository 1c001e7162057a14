"""Settings of decoding and embedding: the `decode` and `embed` sections of a config."""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import Field, model_validator

from prune.settings import PLACEMENT, Section, counted_when

_WITH_TEXT = counted_when(lambda e: e.text)  # read only when captions are embedded


class DecodeConfig(Section):
    batch_size: Annotated[int, PLACEMENT] = Field(256, ge=1)  # images one decode task turns into crops at a time
    draft: bool = True  # JPEG draft decoding down to (at least) the model's input size
    max_image_pixels: int = Field(89_478_485, ge=1)  # PIL's own default bomb threshold
    num_cpus: Annotated[float, PLACEMENT] = Field(1.0, gt=0)  # CPUs each decode task reserves


CPU_BATCH, OTHER_BATCH = 32, 64  # embed.batch_size when unset (EmbedConfig.batch_for)


class EmbedConfig(Section):
    # a registered backend (prune/embed/backends): open_clip, timm, local, ...; the configs that compose
    # this section check the name against the registry (the backends import these settings, not the reverse)
    backend: str = "open_clip"
    # the architecture: an open_clip model name (`open_clip.list_models()`) or a timm one; not read for a
    # `local` checkpoint or an open_clip directory (`local-dir:`, `hf-hub:`), which names its own
    model: str = "ViT-B-32"
    # a tag (from the cache, else fetched once), hf-hub:ORG/REPO (open_clip), a checkpoint file or directory
    pretrained: Optional[str] = None
    allow_random_init: bool = False  # only for tests and smoke runs; recorded in the manifest
    seed: int = 0  # random-init weights
    # where pretrained tags are looked up and fetched into (default: the Hugging Face cache, $HF_HOME/hub);
    # the weights' identity is the model id
    cache_dir: Annotated[Optional[str], PLACEMENT] = None
    # a tag or hf-hub: id missing from the cache is fetched once, by the driver, and verified; auto: unless
    # HF_HUB_OFFLINE is set or the hub cannot be reached (then as false: the cache only, one-line error)
    download: Annotated[Union[Literal["auto"], bool], PLACEMENT] = "auto"
    # the hub to fetch from (a Hugging Face-compatible mirror); default: $HF_ENDPOINT, else huggingface.co
    hub_endpoint: Annotated[Optional[str], PLACEMENT] = None
    # true when embed.cache_dir is one directory every node mounts (NFS, EFS, Lustre): actors load the
    # driver's copy from it; false: the driver's copy travels to each other node once, through Ray's object store
    shared_cache: Annotated[bool, PLACEMENT] = False
    # where the actors run the model: auto (a GPU when the actor has one), cpu or cuda
    device: Annotated[Literal["auto", "cpu", "cuda"], PLACEMENT] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPUs and CPUs with native bf16, else fp32
    batch_size: Annotated[Optional[int], PLACEMENT] = Field(None, ge=1)  # default: `batch_for` the device
    concurrency: Annotated[int, PLACEMENT] = Field(1, ge=1)  # embed actors; one GPU each on a GPU cluster
    num_cpus_per_actor: Annotated[float, PLACEMENT] = Field(1.0, gt=0)  # CPUs each embed actor reserves
    torch_threads: Annotated[Optional[int], PLACEMENT] = Field(None, ge=1)  # CPU actors: intra-op threads
    # also embed each sample's caption with the model's text tower (open_clip) in the same actor
    # pass, and record the caption-image cosine (`clip_score`) beside the image embedding
    text: Annotated[bool, _WITH_TEXT] = False
    # the caption: the sample's .txt member, else this column of the img2dataset parquet beside the tar
    caption_column: Annotated[str, _WITH_TEXT] = "caption"

    def batch_for(self, device: str) -> int:
        """`batch_size`, else by device: on CPU a ViT-B-32 batch of 32 keeps its activations in cache
        (74 img/s against 67 at 64 and 60 at 128, bf16, 2 cores, best of 5); elsewhere 64, as before
        (GPU clusters set theirs: configs/laion.yaml uses 512)."""
        if self.batch_size is not None:
            return self.batch_size
        return CPU_BATCH if device == "cpu" else OTHER_BATCH

    @model_validator(mode="before")
    @classmethod
    def _retired_keys(cls, data):
        if isinstance(data, dict) and "shards_per_round" in data:
            raise ValueError("shards_per_round is retired: the embed stage now runs every shard through one actor "
                             "pool (the model loads once) and writes each shard as soon as it is complete, so a "
                             "crash loses only the shards in flight; remove the key")
        return data

    @model_validator(mode="after")
    def _no_random_init_with_weights(self) -> "EmbedConfig":
        if self.allow_random_init and self.pretrained:
            raise ValueError("embed.allow_random_init and embed.pretrained exclude each other")
        return self
