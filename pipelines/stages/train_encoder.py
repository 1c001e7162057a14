"""Train-encoder stage: SimCLR on the shards themselves, with Ray Data and Ray Train.

Ray Data reads and decodes the shards (the embed stage's own read and decode functions, so
training sees exactly the crops the embed stage will make); Ray Train's TorchTrainer runs the
data-parallel loop (gloo on CPU workers, NCCL with one GPU per worker on a cluster).

Every checkpoint is a directory Ray Train persists under `<output>/ray_train/`: the encoder as
a loadable `local` checkpoint (encoder.safetensors + encoder.json) plus the projection head,
the optimizer (safetensors) and the loop state (JSON). Nothing is pickled. Running the same
command again resumes from the latest checkpoint (an interrupted epoch restarts from its
beginning); when training ends, the last checkpoint's encoder is copied to `<output>/`. So the
stage is never "complete" to the executor: Ray Train's checkpoints are its resume scheme.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from prune import schema
from prune.embed import checkpoints
from prune.embed.decode import PreprocessSpec
from prune.embed.settings import DecodeConfig
from prune.io.storage import is_local
from prune.settings import fingerprint
from prune.train.settings import TrainConfig

from ..decoding import ShardInput, decoded_dataset
from ..stage import Context, Stage

log = logging.getLogger("ssl_prune")

HEAD_FILE = "head.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "train_state.json"
RAY_TRAIN_DIR = "ray_train"
RUN_NAME = "simclr"


def train_spec(cfg: TrainConfig) -> PreprocessSpec:
    """The crop both training and the embed stage decode to (stored in encoder.json)."""
    return PreprocessSpec(size=cfg.image_size, mean=tuple(cfg.mean), std=tuple(cfg.std),
                          interpolation=cfg.interpolation, resize_mode="shortest")


def model_fingerprint(cfg: TrainConfig) -> str:
    """What a checkpoint's tensors depend on: resuming with another value is an error."""
    return fingerprint(cfg.architecture, cfg.model_kwargs, cfg.image_size, list(cfg.mean), list(cfg.std),
                       cfg.projection_hidden, cfg.projection_dim)


def ok_pixels(batch: dict) -> dict:
    """Only the decoded crops of samples that decoded; failures are left out of training."""
    ok = np.asarray(batch[schema.STATUS]) == schema.STATUS_OK
    return {schema.PIXELS: batch[schema.PIXELS][ok]}


def training_dataset(shards: dict[str, str], train: TrainConfig, decode: DecodeConfig, image_extensions: list[str]):
    """Shards -> Ray Dataset of uint8 crops (materialized once when train.cache_decoded)."""
    items = [ShardInput(s, u) for s, u in sorted(shards.items())]
    ds = decoded_dataset(items, decode, image_extensions, train_spec(train))
    ds = ds.map_batches(ok_pixels, batch_size=None, zero_copy_batch=True)
    return ds.materialize() if train.cache_decoded else ds


class _Gather:
    """Differentiable all-gather across the data-parallel workers (negatives from every batch)."""

    def __init__(self, rank: int):
        self.rank = rank

    def __call__(self, t):
        from prune.train.ssl import all_gather_with_grad

        return all_gather_with_grad(t)


def _save_checkpoint(d: str, model, optimizer, cfg: TrainConfig, state: dict) -> None:
    """One checkpoint directory: a loadable encoder + what resuming needs, all safetensors/JSON."""
    checkpoints.save_encoder(d, model.backbone, cfg.architecture, cfg.model_kwargs, train_spec(cfg),
                             extra={"trained_with": "ssl-prune train-encoder (SimCLR)", "train_step": state["step"]})
    checkpoints.save_tensors(os.path.join(d, HEAD_FILE), model.head.state_dict())
    tensors, groups = checkpoints.optimizer_tensors(optimizer)
    checkpoints.save_tensors(os.path.join(d, OPTIMIZER_FILE), tensors)
    with open(os.path.join(d, STATE_FILE), "w") as f:
        json.dump(state | {"param_groups": groups}, f, indent=1)


def _check_resumable(d: str, state: dict, cfg: TrainConfig) -> None:
    if state.get("model_fingerprint") != model_fingerprint(cfg):
        raise ValueError(
            f"the checkpoint in {d} was trained with another architecture/input/head; "
            "use a new output directory for a different model"
        )


def _latest_checkpoint_state(run_dir: str) -> tuple[str, dict] | None:
    """The newest checkpoint Ray Train would resume from under `run_dir`, and its state; None if none."""
    import glob

    found = sorted(glob.glob(os.path.join(run_dir, "**", STATE_FILE), recursive=True), key=os.path.getmtime)
    if not found:
        return None
    with open(found[-1]) as f:
        return os.path.dirname(found[-1]), json.load(f)


def _load_checkpoint(d: str, model, optimizer, cfg: TrainConfig) -> dict:
    from safetensors.torch import load_file

    with open(os.path.join(d, STATE_FILE)) as f:
        state = json.load(f)
    _check_resumable(d, state, cfg)
    model.backbone.load_state_dict(load_file(os.path.join(d, checkpoints.WEIGHTS_FILE)), strict=True)
    model.head.load_state_dict(load_file(os.path.join(d, HEAD_FILE)), strict=True)
    checkpoints.load_optimizer(optimizer, load_file(os.path.join(d, OPTIMIZER_FILE)), state.pop("param_groups"))
    return state


def train_loop(config: dict) -> None:
    """Runs in every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch

    from prune.embed.backends import resolve_precision
    from prune.train.ssl import SimCLR, augment, lr_at, nt_xent

    cfg: TrainConfig = config["train"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cfg.torch_threads or max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)  # the same initial weights on every worker (DDP also broadcasts them)
    model = SimCLR(checkpoints.build_model(cfg.architecture, cfg.model_kwargs), cfg.projection_hidden, cfg.projection_dim)
    if device.type == "cuda" and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # SimCLR's global BN
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"epoch": 0, "step": 0, "history": [], "model_fingerprint": model_fingerprint(cfg)}
    resumed = ray.train.get_checkpoint()
    if resumed:
        with resumed.as_directory() as d:
            state = _load_checkpoint(d, model, optimizer, cfg)
    model = model.to(device, memory_format=torch.channels_last)  # the fast conv layout on CPU and GPU
    precision = resolve_precision(cfg.precision, device.type)
    for entry in optimizer.state.values():  # restored moments follow the model to its device
        for k, v in entry.items():
            if torch.is_tensor(v) and k != "step":
                entry[k] = v.to(device)
    ddp = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    gather = _Gather(rank) if world > 1 else None
    steps_per_epoch = config["samples"] // (cfg.batch_size * world)
    total = min(cfg.max_steps or 1 << 62, cfg.epochs * steps_per_epoch)
    g = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank * 7919 + state["step"])
    shard = ray.train.get_dataset_shard("train")
    losses: list[float] = []

    def report(epoch_done: bool) -> None:
        """All workers report together; rank 0 attaches the checkpoint."""
        state["history"].append({"step": state["step"], "epoch": state["epoch"],
                                 "loss": float(np.mean(losses)) if losses else None, "time": time.time()})
        metrics = {"step": state["step"], "epoch": state["epoch"], "loss": state["history"][-1]["loss"]}
        losses.clear()
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                _save_checkpoint(d, model, optimizer, cfg, state | {"epoch_done": epoch_done})
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)

    if resumed and state.get("epoch_done"):
        state["epoch"] += 1
    model.train()
    t_log = time.time()
    while state["epoch"] < cfg.epochs and state["step"] < total:
        for batch in shard.iter_torch_batches(batch_size=cfg.batch_size, drop_last=True, device=device,
                                              local_shuffle_buffer_size=cfg.batch_size * 4, dtypes=torch.uint8):
            x = batch[schema.PIXELS]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(state["step"], total, cfg.lr, cfg.warmup_steps)
            views = torch.cat([augment(x, cfg.augment, cfg.image_size, cfg.mean, cfg.std, g) for _ in range(2)])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                z = ddp(views.contiguous(memory_format=torch.channels_last)).float()
            loss = nt_xent(z[: len(x)], z[len(x):], cfg.temperature, gather)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            state["step"] += 1
            if rank == 0 and state["step"] % 50 == 0:
                rate = 50 * len(x) * world / (time.time() - t_log)
                log.info("step %d/%d epoch %d loss %.4f lr %.2e %.0f img/s", state["step"], total,
                         state["epoch"], float(np.mean(losses[-50:])), optimizer.param_groups[0]["lr"], rate)
                t_log = time.time()
            if state["step"] >= total:
                break
            if state["step"] % cfg.checkpoint_every_steps == 0:
                report(epoch_done=False)
        report(epoch_done=True)
        state["epoch"] += 1


def export_encoder(checkpoint_path: str, output: str, dtype: str) -> dict:
    """The checkpoint's encoder, re-saved in `dtype` to the output root (weights first, config last)."""
    import torch

    model, config = checkpoints.load_encoder(checkpoint_path)
    model = model.to(getattr(torch, dtype))
    checkpoints.save_encoder(output, model, config["architecture"], config["model_kwargs"],
                             checkpoints.preprocess_of(config), extra=checkpoints.extra_of(config) | {"dtype": dtype})
    return checkpoints.read_config(output)


@dataclass
class TrainStats:
    checkpoint: str  # the exported encoder's directory: a `local` backend checkpoint
    architecture: str
    embed_dim: int
    samples: int
    steps: int
    loss: float
    seconds: float
    history: list = field(default_factory=list)


@dataclass
class TrainEncoderStage(Stage):
    """An encoder trained on the input shards, exported to the output directory."""

    name = "train_encoder"

    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    image_extensions: tuple[str, ...] = schema.IMAGE_EXTENSIONS_DEFAULT

    def identity(self, ctx: Context) -> tuple:
        return (self.train, *self.decode.fingerprinted().values(), list(self.image_extensions))

    def complete(self, ctx: Context) -> Optional[TrainStats]:
        return None  # Ray Train resumes from its own latest checkpoint

    def run(self, ctx: Context) -> TrainStats:
        """Train (or resume) and export."""
        from ray.train import CheckpointConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        cfg = self.train
        if not is_local(ctx.out.fs):
            raise ValueError("train-encoder writes its checkpoints to a local (or shared) directory, not object storage")
        output = os.path.abspath(os.path.expanduser(ctx.out.root))
        os.makedirs(output, exist_ok=True)
        previous = _latest_checkpoint_state(os.path.join(output, RAY_TRAIN_DIR, RUN_NAME))
        if previous:  # on the driver, before any decoding: the workers would refuse it after start-up
            _check_resumable(*previous, cfg)
        t0 = time.time()
        ds = training_dataset(ctx.shards, cfg, self.decode, list(self.image_extensions))
        samples = ds.count()
        if samples < cfg.batch_size * cfg.num_workers:
            raise ValueError(
                f"{samples} decodable samples in {len(ctx.shards)} input shards, fewer than one global batch "
                f"(train.batch_size {cfg.batch_size} x train.num_workers {cfg.num_workers})"
            )
        log.info("training on %d samples from %d shards", samples, len(ctx.shards))
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"train": cfg, "samples": samples},
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                         resources_per_worker={"CPU": cfg.cpus_per_worker}),
            run_config=RunConfig(name=RUN_NAME, storage_path=os.path.join(output, RAY_TRAIN_DIR),
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
            datasets={"train": ds},
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"training produced no checkpoint (error: {result.error})")
        with result.checkpoint.as_directory() as d:
            config = export_encoder(d, output, cfg.export_dtype)
            with open(os.path.join(d, STATE_FILE)) as f:
                state = json.load(f)
        history = state["history"]
        return TrainStats(
            checkpoint=output, architecture=config["architecture"], embed_dim=config["embed_dim"], samples=samples,
            steps=state["step"],
            loss=next((h["loss"] for h in reversed(history) if h["loss"] is not None), float("nan")),
            seconds=round(time.time() - t0, 1), history=history,
        )
