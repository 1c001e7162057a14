"""Train-clip stage: a small CLIP (open_clip's own model, tokenizer and ClipLoss) on image-caption shards.

One Ray task does the work, with the CPUs (or the GPU) `train` asks for: it reads and decodes the
shards with the functions the embed stage's Ray Data pipeline maps (`read_rows`, `decode_rows`:
the same crops, the same captions: the .txt member, else the parquet's caption column), tokenizes
the captions with open_clip's tokenizer, trains in that one process and writes the checkpoint
directory in open_clip's layout (prune/train/clip.py). Not Ray Train: the model is small enough
that one process trains it in minutes, and CLIP's loss wants the whole batch in one place (no
gather of features across workers, no DDP); a Ray task still puts it where the resources are.

The directory is complete when its train_clip.json carries this stage's fingerprint (the
settings and the input tars as they are now): a re-run with the same settings and input is
skipped; any change trains again from the start (there is no mid-training resume: minutes).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from prune import schema
from prune.embed.settings import DecodeConfig, EmbedConfig
from prune.io.storage import is_local, split_url
from prune.io.tar_index_cache import tar_stamp
from prune.settings import ConfigError
from prune.train.clip_settings import ClipModelConfig, ClipTrainConfig

from .. import runtime
from ..decoding import decode_rows, read_rows
from ..stage import Context, Resources, Stage

log = logging.getLogger("ssl_prune")


@dataclass
class TrainClipStats:
    checkpoint: str  # the directory: open_clip_config.json + open_clip_model.safetensors + train_clip.json
    model_id: str  # as the open_clip backend names it: open_clip:local-dir:<weights sha256 prefix>
    pairs: int  # decoded images with a caption: what it trained on
    without_caption: int  # decoded images without one (left out)
    failed: dict  # status -> samples that could not be read or decoded
    steps: int
    epochs: int
    loss: float
    seconds: float
    weights_bytes: int
    history: list = field(default_factory=list)


def _stats(output: str, record: dict) -> TrainClipStats:
    data, w = record["data"], record["weights"]
    return TrainClipStats(
        checkpoint=output, model_id=record["model_id"], pairs=data["pairs"], without_caption=data["without_caption"],
        failed=data["failed"], steps=record["steps"], epochs=record["epochs"], loss=record["loss"],
        seconds=record["seconds"], weights_bytes=w["bytes"], history=record["history"],
    )


def read_pairs(shards: dict[str, str], decode: DecodeConfig, image_extensions: list[str], spec,
               caption_column: str) -> tuple[np.ndarray, list[str], Counter]:
    """Every decodable image with a caption in the shards: (uint8 crops [N, s, s, 3], captions,
    counts of the rest by status, `no_caption` for images without one)."""
    crops, captions, counts = [], [], Counter()
    for shard, url in sorted(shards.items()):
        rows = read_rows({"shard": shard, "url": url}, image_extensions, None, caption_column)
        for first in range(0, len(rows), decode.batch_size):
            chunk = rows[first : first + decode.batch_size]
            batch = {k: [r[k] for r in chunk] for k in (schema.IMAGE, schema.STATUS, schema.CAPTION)}
            out = decode_rows(batch, spec, decode.draft, decode.max_image_pixels)
            for pixels, status, caption in zip(out[schema.PIXELS], out[schema.STATUS], out[schema.CAPTION]):
                if status != schema.STATUS_OK:
                    counts[str(status).split(":", 1)[0]] += 1
                elif caption is None:
                    counts["no_caption"] += 1
                else:
                    crops.append(pixels)
                    captions.append(caption)
    size = spec.size
    return (np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)), captions, counts


def train_clip_task(job: dict) -> dict:
    """In one Ray task: read, decode, tokenize, train, write the directory; -> its record."""
    import torch

    from prune.embed.backends import model_id_for, resolve_precision
    from prune.embed.backends.open_clip_backend import dir_preprocess_spec
    from prune.train import clip

    model_cfg: ClipModelConfig = job["model"]
    train: ClipTrainConfig = job["train"]
    t0 = time.time()
    if not logging.getLogger().handlers and not log.handlers:  # a bare Ray worker: the steps to its stderr
        handler = logging.StreamHandler()                       # (on the console with --verbose)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    device = "cuda" if train.use_gpu else "cpu"
    if device == "cpu":
        torch.set_num_threads(train.torch_threads or max(1, int(train.num_cpus)))
    spec = dir_preprocess_spec({"model_cfg": model_cfg.model_cfg(), "preprocess_cfg": model_cfg.preprocess_cfg()})
    crops, captions, counts = read_pairs(job["shards"], job["decode"], job["image_extensions"], spec,
                                         train.caption_column)
    if len(captions) < train.batch_size:  # the user's to fix: the driver raises it as a config error
        return {"error": f"{len(captions)} decodable image-caption pairs in {len(job['shards'])} input shards "
                         f"({dict(counts)} left out), fewer than one batch (train.batch_size {train.batch_size})"}
    log.info("training a CLIP on %d image-caption pairs from %d shards", len(captions), len(job["shards"]))
    tokens = clip.tokenizer(model_cfg)(captions)
    torch.manual_seed(train.seed)
    model = clip.build_clip(model_cfg, train.init_logit_scale)
    loop = clip.fit(model, torch.from_numpy(crops), tokens, train, spec, device, resolve_precision(train.precision, device))
    used = np.unique(tokens.numpy()) if train.zero_unused_tokens else None
    output = job["output"]
    weights = clip.save_clip(output, model.cpu(), model_cfg, train.export_dtype, used)
    no_caption = counts.pop("no_caption", 0)
    record = {
        "trained_with": "ssl-prune train-clip (open_clip CLIP, ClipLoss)", "fingerprint": job["fingerprint"],
        "model_id": model_id_for(EmbedConfig(backend="open_clip", pretrained=output)),
        "settings": {"model": model_cfg.model_dump(mode="json"), "train": train.model_dump(mode="json"),
                     "decode": job["decode"].model_dump(mode="json"), "image_extensions": list(job["image_extensions"])},
        "data": {"shards": sorted(job["shards"].values()), "pairs": len(captions), "without_caption": no_caption,
                 "failed": dict(sorted(counts.items())), "tokens_used": None if used is None else int(len(used))},
        "weights": weights, "device": device, "precision": resolve_precision(train.precision, device),
        **loop, "seconds": round(time.time() - t0, 1),
    }
    clip.write_record(output, record)
    return record


@dataclass
class TrainClipStage(Stage):
    """A CLIP trained on the input shards' images and captions, written to the output directory."""

    name = "train_clip"
    reads_tars = True

    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    train: ClipTrainConfig = field(default_factory=ClipTrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    image_extensions: tuple[str, ...] = schema.IMAGE_EXTENSIONS_DEFAULT

    def identity(self, ctx: Context) -> tuple:
        """The settings that count, and every input tar as it is now (path, size, version)."""
        tars = [(shard, url, tar_stamp(*split_url(url))) for shard, url in sorted(ctx.shards.items())]
        return (*super().identity(ctx), tars)

    def resources(self, ctx: Context) -> Resources:
        return Resources(num_cpus=self.train.num_cpus, num_gpus=1 if self.train.use_gpu else 0)

    def _output(self, ctx: Context) -> str:
        if not is_local(ctx.out.fs):
            raise ValueError("train-clip writes its checkpoint to a local (or shared) directory, not object storage")
        return os.path.abspath(os.path.expanduser(ctx.out.root))

    def complete(self, ctx: Context) -> Optional[TrainClipStats]:
        from prune.embed.backends.open_clip_backend import read_open_clip_dir, weights_sha256
        from prune.embed.errors import WeightsNotFoundError
        from prune.train.clip import read_record

        output = self._output(ctx)
        record = read_record(output)
        if not record or record.get("fingerprint") != ctx.fingerprint:
            return None
        try:
            weights = read_open_clip_dir(output)[1]
        except WeightsNotFoundError:
            return None
        return _stats(output, record) if weights_sha256(weights) == record["weights"]["weights_sha256"] else None

    def run(self, ctx: Context) -> TrainClipStats:
        output = self._output(ctx)
        os.makedirs(output, exist_ok=True)
        if self.train.num_cpus > runtime.cluster_cpus():
            raise ConfigError(f"train.num_cpus {self.train.num_cpus:g} is more than the Ray cluster's "
                             f"{runtime.cluster_cpus()} CPUs: the training task would never start")
        job = {"model": self.model, "train": self.train, "decode": self.decode, "image_extensions": list(self.image_extensions),
               "shards": dict(ctx.shards), "output": output, "fingerprint": ctx.fingerprint}
        record = next(runtime.run_tasks(train_clip_task, [job], desc=f"{self.name}: training",
                                        **self.resources(ctx).ray_args()))
        if "error" in record:
            raise ConfigError(record["error"])
        return _stats(output, record)
