"""The embed stage's output, staged and finalized shard by shard while the pipeline streams.

The embed actors' batches are written to a staging area, one Parquet file per shard a batch
touches (`stage_rows`, a CPU task after the actors); only a small row per file (shard, rows,
shard size) reaches the driver. As soon as a shard's rows have all arrived, a task checks that
every sample is there exactly once (rows a retried task wrote twice count once) and writes
`embeddings/NNNNN.parquet` atomically. So one dataset, and one actor pool loading the model once,
serves the whole run, and a crash loses only the shards in flight.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from prune import schema
from prune.io.storage import OutputDir

from .decoding import COUNT, POS
from .runtime import progress_bar, remote_fn, run_tasks

ARRIVED = "_arrived"  # rows of one shard in one staged file (internal)
STAGE_WRITE_CPUS = 0.25  # a staging write is light; its own resources also keep it out of the actors


def embeddings_complete(out: OutputDir, shard: str, fp: str, url: str) -> bool:
    """Made with these settings from this very input file (a same-named shard elsewhere is not it)."""
    name = schema.shard_file(shard)
    if not out.exists(schema.EMBEDDINGS_DIR, name):
        return False
    with out.open(schema.EMBEDDINGS_DIR, name) as f:
        meta = pq.read_schema(f).metadata or {}
    return meta.get(schema.META_EMBED_FINGERPRINT, b"").decode() == fp and meta.get(schema.META_SOURCE_URL, b"").decode() == url


def captionless(out: OutputDir, shard: str) -> int:
    """Samples of a shard embedded fine with embed.text but without a caption (a null clip_score)."""
    with out.open(schema.EMBEDDINGS_DIR, schema.shard_file(shard)) as f:
        pf = pq.ParquetFile(f)
        if schema.CLIP_SCORE not in pf.schema_arrow.names:
            return 0
        t = pf.read(columns=[schema.STATUS, schema.CLIP_SCORE])
    ok = pc.equal(t.column(schema.STATUS), schema.STATUS_OK)
    return int(pc.sum(pc.and_(ok, pc.is_null(t.column(schema.CLIP_SCORE)))).as_py() or 0)


def read_staged(out: OutputDir, part_dir: str) -> pa.Table | None:
    """Every staged file of one shard, concatenated; None if there is none.

    A retried staging write writes a file of its own, so rows may be there twice (counted once
    by position); a file that is not valid parquet (a write cut short on a store where a close
    completes the upload) is skipped, and the count check in `finalize_shard` decides whether
    its rows arrived in another file.
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


@dataclass(frozen=True)
class FinalizeTask:
    out: OutputDir
    shard: str
    url: str
    part_dir: str  # the shard's partition of the staged dataset
    fp: str
    model_id: str


@dataclass(frozen=True)
class Finalized:
    shard: str
    ok: bool
    rows: int = 0  # rows written; -1: the file was complete already (a retried task)
    why: str = ""


def finalize_shard(task: FinalizeTask) -> Finalized:
    """Staged parts of one shard -> embeddings/NNNNN.parquet, if every sample arrived."""
    out, shard = task.out, task.shard
    if embeddings_complete(out, shard, task.fp, task.url):  # a retry of a finished task
        return Finalized(shard, True, -1)
    table = read_staged(out, task.part_dir)
    if table is None:
        return Finalized(shard, False, why="no embedded rows arrived")
    table = table.sort_by(POS)
    pos = table.column(POS).to_numpy()
    pos_unique, first = np.unique(pos, return_index=True)  # a retried task may have re-written rows
    table = table.take(pa.array(first))
    meta = {schema.META_EMBED_FINGERPRINT: task.fp.encode(), schema.META_MODEL_ID: task.model_id.encode(),
            schema.META_SOURCE_URL: task.url.encode()}
    if len(pos_unique) == 1 and pos_unique[0] == -1:  # the shard itself could not be read
        meta[schema.META_SHARD_ERROR] = table.column(schema.STATUS)[0].as_py().encode()
        table = table.slice(0, 0)
    else:
        expected = int(table.column(COUNT)[0].as_py())
        if len(pos_unique) != expected or pos_unique[0] != 0:
            return Finalized(shard, False, why=f"{len(pos_unique)} of {expected} samples arrived")
    dim = table.schema.field(schema.EMBEDDING).type.list_size
    columns = {
        schema.KEY: table.column(schema.KEY),
        schema.SHARD: pa.array([shard] * len(table), pa.string()),
        schema.STATUS: table.column(schema.STATUS),
        schema.EMBEDDING: table.column(schema.EMBEDDING),
    }
    text_dim = None
    if schema.CLIP_SCORE in table.column_names:  # embed.text: the captions' embeddings and scores
        text_dim = table.schema.field(schema.TEXT_EMBEDDING).type.list_size
        columns |= {name: table.column(name) for name in (schema.TEXT_EMBEDDING, schema.CLIP_SCORE)}
    final = pa.table(columns, schema=schema.embeddings_schema(dim, text_dim)).replace_schema_metadata(meta)
    with out.open_atomic(schema.EMBEDDINGS_DIR, schema.shard_file(shard)) as f:
        pq.write_table(final, f)
    return Finalized(shard, True, len(final))


def stage_rows(table: pa.Table, out: OutputDir, run_dir: str) -> pa.Table:
    """One block of embedded rows -> one staged file per shard it holds -> (shard, rows, shard size) per file."""
    shard_col = table.column(schema.SHARD)
    names, arrived, counts = [], [], []
    for shard in pc.unique(shard_col).to_pylist():
        part = table.filter(pc.equal(shard_col, shard))
        with out.open_atomic(run_dir, f"{schema.SHARD}={shard}", f"{uuid.uuid4().hex}.parquet") as f:
            pq.write_table(part.drop_columns([schema.SHARD]), f)
        names.append(shard)
        arrived.append(len(part))
        counts.append(int(part.column(COUNT)[0].as_py()))
    return pa.table({schema.SHARD: pa.array(names, pa.string()), ARRIVED: pa.array(arrived, pa.int64()),
                     COUNT: pa.array(counts, pa.int64())})


class ShardArrivals:
    """Rows staged per shard, and which shards look complete (a shard that could not be read
    stands as one row with size 0). A row written twice by a retried task may make a shard look
    complete early: finalizing checks, and a shard it refuses is finalized again at the end."""

    def __init__(self):
        self.arrived: dict[str, int] = {}
        self.submitted: set[str] = set()

    def add(self, shard: str, rows: int, count: int) -> bool:
        """Count `rows` more of `shard`; True the first time it looks complete."""
        self.arrived[shard] = self.arrived.get(shard, 0) + int(rows)
        if shard in self.submitted or self.arrived[shard] < max(int(count), 1):
            return False
        self.submitted.add(shard)
        return True


def finalize_as_staged(ds, tasks: dict[str, FinalizeTask], desc: str = "embeddings: finalize shards") -> int:
    """Stream `ds` (rows from `stage_rows`), finalizing each shard as soon as its rows are in;
    -> shards written. Raises if a shard is incomplete once the whole dataset has run."""
    remote = remote_fn(finalize_shard, {})
    bar, shared = progress_bar(desc, len(tasks))
    arrivals, running, retry, written = ShardArrivals(), {}, [], 0

    def collect(timeout: float | None) -> None:
        nonlocal written
        if not running:
            return
        done, _ = ray.wait(list(running), num_returns=len(running), timeout=timeout)
        for ref in done:
            shard = running.pop(ref)
            result: Finalized = ray.get(ref)
            if result.ok:
                written += 1
                if bar:
                    bar.update(1)
            else:
                retry.append(shard)

    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for shard, rows, count in zip(*(batch.column(c).to_pylist() for c in (schema.SHARD, ARRIVED, COUNT))):
                if arrivals.add(shard, rows, count):
                    running[remote.remote(tasks[shard])] = shard
            collect(0)  # the finished ones only: never wait on the pipeline's account
        collect(None)
        # every row is staged now: what looked complete too early, or never did, gets a last check
        last = retry + sorted(set(tasks) - arrivals.submitted)
        for result in run_tasks(finalize_shard, [tasks[s] for s in last]):
            if not result.ok:
                raise RuntimeError(f"shard {result.shard}: {result.why}")
            written += 1
            if bar:
                bar.update(1)
        return written
    finally:
        if bar and not shared:
            bar.close()
