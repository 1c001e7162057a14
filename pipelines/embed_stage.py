"""Embed stage: shards -> read (tasks) -> decode (CPU tasks) -> embed (actor pool) -> parquet.

Ray Data streams rows of image bytes from the tars, decodes them in CPU tasks (so the model
never waits for JPEG decoding), and feeds uint8 crops to a pool of actors that load the
model once each. Outputs land in a staging dataset partitioned by shard; a per-shard task
then checks that every sample of the shard arrived (rows a retried task wrote twice count
once) and writes `embeddings/NNNNN.parquet` atomically (OutputDir.open_atomic). Shards are processed in rounds, so a crash loses one round at most.
"""

from __future__ import annotations

import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from prune import schema
from prune.config import EmbedConfig, RunConfig, JobConfig, fingerprint
from prune.decode import PreprocessSpec, decode_batch
from prune.embedders import make_embedder, model_id_for, preprocess_spec_for
from prune.shards import read_shard
from prune.storage import OutputDir

from .runtime import cluster_gpus, run_tasks

POS = "_pos"  # position of the sample in its tar (internal)
COUNT = "_count"  # samples in the shard (internal): a shard is complete when all arrived
SHARD_ERROR_KEY = ""  # the key of the one row that stands for a shard that could not be read


def embed_fingerprint(cfg: RunConfig) -> str:
    e = cfg.embed
    return fingerprint(
        "embed", model_id_for(e), e.backend, e.model, e.pretrained, e.allow_random_init, e.seed, e.precision,
        cfg.decode.draft, cfg.decode.max_image_pixels, cfg.image_extensions,
    )


def read_rows(item: dict, image_extensions: list[str]) -> list[dict]:
    """One tar -> one row per sample (image bytes, or empty with the failure status)."""
    result = read_shard(item["url"], image_extensions)
    shard = item["shard"]
    if result.shard_error:
        return [{schema.SHARD: shard, schema.KEY: SHARD_ERROR_KEY, POS: -1, COUNT: 0,
                 schema.STATUS: f"{result.shard_error}: {result.detail}"[:500], "image": b""}]
    n = len(result.samples)
    rows = []
    for i, s in enumerate(result.samples):
        found = s.member(image_extensions) if s.status == schema.STATUS_OK else None
        rows.append({schema.SHARD: shard, schema.KEY: s.key, POS: i, COUNT: n,
                     schema.STATUS: s.status, "image": found[1] if found else b""})
    return rows


def decode_rows(batch: dict, spec: PreprocessSpec, draft: bool, max_pixels: int) -> dict:
    """CPU decode + geometric preprocessing of one batch (a stateless task, not an actor)."""
    pixels, status = decode_batch(list(batch["image"]), list(batch[schema.STATUS]), spec, draft, max_pixels)
    out = {k: v for k, v in batch.items() if k != "image"}
    out[schema.STATUS] = np.array(status, dtype=object)
    out["pixels"] = pixels
    return out


def decode_memory_bytes(batch_size: int, spec: PreprocessSpec) -> int:
    """Memory to reserve for one decode task: input bytes, uint8 crops, PIL's working copies."""
    return int(batch_size * spec.size * spec.size * 3 * 8 + 128 * 2**20)


class EmbedActor:
    """Loads the model once per actor; maps a batch of crops to unit-norm float16 vectors."""

    def __init__(self, embed_cfg: dict, spec: PreprocessSpec, device: str):
        self.embedder = make_embedder(EmbedConfig(**embed_cfg), device)
        if self.embedder.preprocess != spec:
            raise RuntimeError(
                f"the model's preprocessing {self.embedder.preprocess} differs from the one the "
                f"decode stage used {spec}"
            )

    def __call__(self, batch: dict) -> pa.Table:
        ok = batch[schema.STATUS] == schema.STATUS_OK
        n, dim = len(ok), self.embedder.dim
        vecs = np.zeros((n, dim), dtype=np.float16)
        if ok.any():
            vecs[ok] = self.embedder.embed(batch["pixels"][ok]).astype(np.float16)
        emb = pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), dim, mask=pa.array(~ok))
        return pa.table({
            schema.SHARD: pa.array(batch[schema.SHARD], pa.string()),
            schema.KEY: pa.array(batch[schema.KEY], pa.string()),
            POS: pa.array(batch[POS], pa.int64()),
            COUNT: pa.array(batch[COUNT], pa.int64()),
            schema.STATUS: pa.array(batch[schema.STATUS], pa.string()),
            schema.EMBEDDING: emb,
        })


def embeddings_complete(out: OutputDir, shard: str, fp: str, url: str) -> bool:
    """Made with these settings from this very input file (a same-named shard elsewhere is not it)."""
    name = f"{shard}.parquet"
    if not out.exists(schema.EMBEDDINGS_DIR, name):
        return False
    with out.open(schema.EMBEDDINGS_DIR, name) as f:
        meta = pq.read_schema(f).metadata or {}
    return meta.get(schema.META_EMBED_FINGERPRINT, b"").decode() == fp and meta.get(schema.META_SOURCE_URL, b"").decode() == url


def read_staged(out: OutputDir, part_dir: str) -> pa.Table | None:
    """Every staged file of one shard, concatenated; None if there is none.

    Ray Data names a write task's file by (write id, task index), so a retried task rewrites
    the same object; a file that is not valid parquet (a write cut short on a store where a
    close completes the upload) is skipped, and the count check in `finalize_shard` decides
    whether its rows arrived in another file.
    """
    tables = []
    for rel in out.find(part_dir):
        if not rel.endswith(".parquet"):
            continue
        try:
            with out.open(part_dir, rel) as f:
                tables.append(pq.read_table(f))
        except pa.ArrowInvalid:
            continue
    return pa.concat_tables(tables) if tables else None


def finalize_shard(item: dict) -> dict:
    """Staged parts of one shard -> embeddings/NNNNN.parquet, if every sample arrived."""
    out: OutputDir = item["out"]
    shard, part_dir = item["shard"], item["part_dir"]
    if embeddings_complete(out, shard, item["fp"], item["url"]):  # a retry of a finished task
        return {"shard": shard, "ok": True, "rows": -1}
    table = read_staged(out, part_dir)
    if table is None:
        return {"shard": shard, "ok": False, "why": "no embedded rows arrived"}
    table = table.sort_by(POS)
    pos = table.column(POS).to_numpy()
    pos_unique, first = np.unique(pos, return_index=True)  # a retried task may have re-written rows
    table = table.take(pa.array(first))
    meta = {schema.META_EMBED_FINGERPRINT: item["fp"].encode(), schema.META_MODEL_ID: item["model_id"].encode(), schema.META_SOURCE_URL: item["url"].encode()}
    if len(pos_unique) == 1 and pos_unique[0] == -1:  # the shard itself could not be read
        meta[schema.META_SHARD_ERROR] = table.column(schema.STATUS)[0].as_py().encode()
        table = table.slice(0, 0)
    else:
        expected = int(table.column(COUNT)[0].as_py())
        if len(pos_unique) != expected or pos_unique[0] != 0:
            return {"shard": shard, "ok": False, "why": f"{len(pos_unique)} of {expected} samples arrived"}
    dim = table.schema.field(schema.EMBEDDING).type.list_size
    final = pa.table(
        {
            schema.KEY: table.column(schema.KEY),
            schema.SHARD: pa.array([shard] * len(table), pa.string()),
            schema.STATUS: table.column(schema.STATUS),
            schema.EMBEDDING: table.column(schema.EMBEDDING),
        },
        schema=schema.embeddings_schema(dim),
    ).replace_schema_metadata(meta)
    with out.open_atomic(schema.EMBEDDINGS_DIR, f"{shard}.parquet") as f:
        pq.write_table(final, f)
    return {"shard": shard, "ok": True, "rows": len(final)}


def decoded_dataset(items: list[dict], cfg: JobConfig, spec: PreprocessSpec) -> ray.data.Dataset:
    """Shards ({shard, url} items) -> a Ray Dataset of rows with uint8 crops: read tasks, then
    CPU decode tasks. Shared by embedding and encoder training, so both see the same crops."""
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.flat_map(read_rows, fn_args=(cfg.image_extensions,))
    return ds.map_batches(
        decode_rows, fn_args=(spec, cfg.decode.draft, cfg.decode.max_image_pixels),
        batch_size=cfg.decode.batch_size, num_cpus=cfg.decode.num_cpus,
        # the memory a batch of crops and its PIL intermediates needs; as a side effect these
        # args differ from the actors', so Ray Data never fuses decode into the model actors
        memory=decode_memory_bytes(cfg.decode.batch_size, spec),
    )


def embed_resources(cfg: EmbedConfig) -> tuple[dict, str, int]:
    """Ray resources of one embed actor, its device, and how many actors the cluster can hold.

    A GPU each when there are GPUs; the pool never asks for more GPU actors than GPUs exist.
    """
    gpus = int(cluster_gpus())
    if cfg.device != "cpu" and gpus > 0:
        return {"num_gpus": 1, "num_cpus": cfg.num_cpus_per_actor}, "auto", min(cfg.concurrency, gpus)
    if cfg.device == "cuda":
        raise RuntimeError("embed.device is 'cuda' but the Ray cluster has no GPU resources")
    return {"num_gpus": 0, "num_cpus": cfg.num_cpus_per_actor}, "cpu", cfg.concurrency


def run_embed(cfg: RunConfig, out: OutputDir, shards: dict[str, str]) -> dict:
    """Embed every shard that has no complete embeddings file yet; returns stage stats."""
    fp = embed_fingerprint(cfg)
    todo = [s for s in sorted(shards) if not embeddings_complete(out, s, fp, shards[s])]
    stats = {"shards_total": len(shards), "shards_embedded": 0, "shards_reused": len(shards) - len(todo)}
    if not todo:
        return stats
    spec = preprocess_spec_for(cfg.embed)
    resources, device, actors = embed_resources(cfg.embed)
    stats["actor_resources"] = resources | {"actors": actors}
    embed_cfg = cfg.embed.model_dump()
    if device == "cpu" and embed_cfg["torch_threads"] is None:
        # Ray caps a CPU actor at num_cpus threads; the model is the hot loop, so give each
        # actor its share of the cluster's cores instead (decode tasks are light beside it)
        total = int(ray.cluster_resources().get("CPU", 1))
        per_node = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]), default=1)
        embed_cfg["torch_threads"] = max(1, min(per_node, total // actors))
    stats["torch_threads"] = embed_cfg["torch_threads"]
    model_id = model_id_for(cfg.embed)
    per_round = cfg.embed.shards_per_round
    for start in range(0, len(todo), per_round):
        batch_shards = todo[start : start + per_round]
        run_dir = f"{schema.STAGING_DIR}/embed-{uuid.uuid4().hex[:12]}"
        ds = decoded_dataset([{"shard": s, "url": shards[s]} for s in batch_shards], cfg, spec)
        ds = ds.map_batches(
            EmbedActor, fn_constructor_args=(embed_cfg, spec, device), batch_size=cfg.embed.batch_size,
            compute=ray.data.ActorPoolStrategy(size=actors), **resources,
        )
        # the OutputDir's own filesystem: the same endpoint and credentials as every other write
        # (pyarrow's native S3 client would not read e.g. AWS_ENDPOINT_URL the way botocore does)
        ds.write_parquet(out.path(run_dir), filesystem=out.arrow_filesystem(), partition_cols=[schema.SHARD])
        finals = [
            {"out": out, "shard": s, "url": shards[s], "part_dir": f"{run_dir}/{schema.SHARD}={s}", "fp": fp,
             "model_id": model_id}
            for s in batch_shards
        ]
        for res in run_tasks(finalize_shard, finals, desc="embeddings: finalize shards"):
            if not res["ok"]:
                raise RuntimeError(f"shard {res['shard']}: {res['why']}")
            stats["shards_embedded"] += 1
        out.remove(run_dir)
    return stats

