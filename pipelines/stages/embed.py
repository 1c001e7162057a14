"""Embed stage: shards -> read (tasks) -> decode (CPU tasks) -> embed (actor pool) -> embeddings/.

Ray Data streams rows of image bytes from the tars, decodes them in CPU tasks (so the model
never waits for JPEG decoding), and feeds uint8 crops to a pool of actors that load the model
once for the whole run. Outputs are staged per shard and each shard is finalized as soon as all
of its rows are in (pipelines/embed_staging.py), so a crash loses only the shards in flight.
Complete: every shard's file carries this fingerprint and its input's URL.
"""

from __future__ import annotations

import collections
import functools
import uuid
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import ray

from prune import schema
from prune.embed.backends import (
    BACKENDS,
    Embedder,
    check_weights,
    model_id_for,
    preprocess_spec_for,
)
from prune.embed.decode import PreprocessSpec
from prune.embed.settings import DecodeConfig, EmbedConfig
from prune.io.storage import OutputDir

from ..decoding import COUNT, POS, ShardInput, decoded_dataset
from ..embed_staging import (
    STAGE_WRITE_CPUS,
    FinalizeTask,
    captionless,
    embeddings_complete,
    finalize_as_staged,
    stage_rows,
)
from ..pending import pending, per_shard
from ..runtime import cluster_gpus
from ..stage import STAGES, Context, Resources, Stage
from ..weights_shipment import WeightsShipment, ship, weights_here


@dataclass
class EmbedStats:
    shards_total: int
    shards_embedded: int
    shards_reused: int
    actor_resources: Optional[dict] = None  # Ray resources of one actor, and how many actors
    torch_threads: Optional[int] = None
    without_caption: Optional[int] = None  # with embed.text: samples embedded fine that had no caption
    # what the actors ran on, as each found it: "device/precision[/GPU name]" -> how many actors started
    # (a restarted one counts again); None when nothing was embedded
    actors_ran: Optional[dict] = None


class EmbedActor:
    """Loads the model once per actor; maps a batch of crops to unit-norm float16 vectors."""

    def __init__(self, backend: type[Embedder], embed: EmbedConfig, spec: PreprocessSpec, device: str,
                 shipment: Optional[WeightsShipment] = None, record: Optional[tuple[OutputDir, str]] = None):
        # the class, resolved on the driver: a backend registered by the user's own code is not
        # registered in this worker process; the weights: this node's, else the driver's copy
        self.embedder = backend(weights_here(backend, embed, shipment), device)
        if self.embedder.preprocess != spec:
            raise RuntimeError(
                f"the model's preprocessing {self.embedder.preprocess} differs from the one the "
                f"decode stage used {spec}"
            )
        if record is not None:  # where the model landed, for the stage's stats (a GPU run says so)
            out, run_dir = record
            out.write_json({"ran": ran_on(self.embedder)}, run_dir, ACTORS_DIR, f"{uuid.uuid4().hex}.json")

    def __call__(self, batch: dict) -> pa.Table:
        ok = batch[schema.STATUS] == schema.STATUS_OK
        n, dim = len(ok), self.embedder.dim
        vecs = np.zeros((n, dim), dtype=np.float32)
        if ok.any():
            vecs[ok] = self.embedder.embed(batch[schema.PIXELS][ok])
        emb = pa.FixedSizeListArray.from_arrays(pa.array(vecs.astype(np.float16).reshape(-1)), dim, mask=pa.array(~ok))
        columns = {
            schema.SHARD: pa.array(batch[schema.SHARD], pa.string()),
            schema.KEY: pa.array(batch[schema.KEY], pa.string()),
            POS: pa.array(batch[POS], pa.int64()),
            COUNT: pa.array(batch[COUNT], pa.int64()),
            schema.STATUS: pa.array(batch[schema.STATUS], pa.string()),
            schema.EMBEDDING: emb,
        }
        if schema.CAPTION in batch:
            columns |= self.captions(batch[schema.CAPTION], ok, vecs)
        return pa.table(columns)

    def captions(self, captions: np.ndarray, ok: np.ndarray, images: np.ndarray) -> dict:
        """The batch's captions through the text tower, in the same pass: their embeddings and
        each one's cosine with its image (null where the sample has no caption or failed)."""
        has = ok & np.array([c is not None for c in captions], dtype=bool)
        dim = self.embedder.text_dim
        text = np.zeros((len(ok), dim), dtype=np.float32)
        if has.any():
            text[has] = self.embedder.embed_text([str(c) for c in captions[has]])
        score = np.einsum("ij,ij->i", text, images).astype(np.float32)
        return {schema.TEXT_EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(text.astype(np.float16).reshape(-1)), dim,
                                                                         mask=pa.array(~has)),
                schema.CLIP_SCORE: pa.array(score, pa.float32(), mask=~has)}


ACTORS_DIR = "actors"  # in the run's staging directory: one record per embed actor


def ran_on(embedder: Embedder) -> str:
    """device/precision, and the GPU's name on CUDA: what an actor's model runs on."""
    ran = f"{embedder.device}/{embedder.precision}"
    if embedder.device == "cuda":
        import torch

        ran += f"/{torch.cuda.get_device_name()}"
    return ran


def _embedded(fp: str, urls: dict, out: OutputDir, shard: str) -> bool:
    return embeddings_complete(out, shard, fp, urls[shard])


@STAGES.register
@dataclass
class EmbedStage(Stage):
    """Every shard's embeddings, in `embeddings/` (of the split's own directory in `evaluate`)."""

    name = "embed"
    reads_tars = True

    embed: EmbedConfig = field(default_factory=EmbedConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    image_extensions: tuple[str, ...] = schema.IMAGE_EXTENSIONS_DEFAULT
    split: str = ""  # a named split of the job's input (evaluate: train, test); "" the run's input
    # (run key, shards without complete embeddings): checked once, shared by complete() and run()
    _todo: tuple = field(default=(None, None), init=False, repr=False, compare=False)
    # the cache files the weights are, as the driver found or fetched them (setup)
    _weights: tuple = field(default=(), init=False, repr=False, compare=False)

    @functools.cached_property
    def model_id(self) -> str:
        return model_id_for(self.embed)

    def identity(self, ctx: Context) -> tuple:
        # the weights (the model id), then each setting that counts, flat
        return (self.model_id, *self.embed.fingerprinted().values(), *self.decode.fingerprinted().values(),
                list(self.image_extensions))

    def setup(self) -> None:
        # before any work: the weights are on this machine, fetched once here if they may be
        self._weights = tuple(check_weights(self.embed))

    def resources(self, ctx: Context) -> Resources:
        """A GPU per actor when the cluster has GPUs (unless embed.device is cpu)."""
        use_gpu = self.embed.device != "cpu" and cluster_gpus() > 0
        if self.embed.device == "cuda" and not use_gpu:
            raise RuntimeError("embed.device is 'cuda' but the Ray cluster has no GPU resources")
        return Resources(num_cpus=self.embed.num_cpus_per_actor, num_gpus=1 if use_gpu else 0)

    def todo(self, ctx: Context) -> list[str]:
        """Shards without complete embeddings (checked once per run: complete() and run() share it)."""
        key = (ctx.out.url, ctx.fingerprint, tuple(sorted(ctx.shards.items())))
        if self._todo[0] != key:
            is_done = functools.partial(_embedded, ctx.fingerprint, dict(ctx.shards))
            self._todo = (key, pending(ctx.out, ctx.shards, is_done))
        return self._todo[1]

    def complete(self, ctx: Context) -> Optional[EmbedStats]:
        if self.todo(ctx):
            return None
        return self.count_captions(ctx, EmbedStats(len(ctx.shards), 0, len(ctx.shards)))

    def count_captions(self, ctx: Context, stats: EmbedStats) -> EmbedStats:
        """With embed.text, how many samples had no caption (a null score, never a failure)."""
        if self.embed.text:
            stats.without_caption = sum(per_shard(ctx.out, ctx.shards, captionless).values())
        return stats

    def run(self, ctx: Context) -> EmbedStats:
        out, shards = ctx.out, ctx.shards
        todo = self.todo(ctx)
        self._todo = (None, None)  # what this run embeds is done after it: a later call checks afresh
        stats = EmbedStats(len(shards), 0, len(shards) - len(todo))
        if not todo:
            return self.count_captions(ctx, stats)
        spec = preprocess_spec_for(self.embed)
        res = self.resources(ctx)
        device = "auto" if res.num_gpus else "cpu"
        # the pool never asks for more GPU actors than GPUs exist
        actors = min(self.embed.concurrency, int(cluster_gpus())) if res.num_gpus else self.embed.concurrency
        stats.actor_resources = {"num_gpus": res.num_gpus, "num_cpus": res.num_cpus, "actors": actors}
        embed = self.embed
        if device == "cpu" and embed.torch_threads is None:
            # Ray caps a CPU actor at num_cpus threads; the model is the hot loop, so give each
            # actor its share of the cluster's cores instead (decode tasks are light beside it)
            total = int(ray.cluster_resources().get("CPU", 1))
            per_node = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]), default=1)
            embed = embed.model_copy(update={"torch_threads": max(1, min(per_node, total // actors))})
        stats.torch_threads = embed.torch_threads
        run_dir = f"{schema.STAGING_DIR}/embed-{uuid.uuid4().hex[:12]}"
        # one dataset for every shard to embed: one actor pool, so each actor loads the model
        # once for the whole run; a shard is finalized as soon as all of its rows are staged
        ds = decoded_dataset([ShardInput(s, shards[s]) for s in todo], self.decode, list(self.image_extensions), spec,
                             index_out=ctx.out, caption_column=self.embed.caption_column if self.embed.text else None)
        ds = ds.map_batches(
            EmbedActor, fn_constructor_args=(BACKENDS.get(embed.backend), embed, spec, device,
                                             ship(list(self._weights), embed, ctx.ray == "local"), (out, run_dir)),
            batch_size=embed.batch_for("cuda" if res.num_gpus else "cpu"),
            compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=res.num_gpus, num_cpus=res.num_cpus,
        )
        ds = ds.map_batches(stage_rows, fn_args=(out, run_dir), batch_size=None, batch_format="pyarrow",
                            num_cpus=STAGE_WRITE_CPUS)
        tasks = {s: FinalizeTask(out, s, shards[s], f"{run_dir}/{schema.SHARD}={s}", ctx.fingerprint, self.model_id)
                 for s in todo}
        stats.shards_embedded = finalize_as_staged(ds, tasks)
        stats.actors_ran = dict(collections.Counter(out.read_json(run_dir, ACTORS_DIR, name)["ran"]
                                                    for name in out.listdir(run_dir, ACTORS_DIR)))
        out.remove(run_dir)
        return self.count_captions(ctx, stats)
