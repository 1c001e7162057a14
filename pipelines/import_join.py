"""Imported embeddings joined back to the tar shards by key, for a run that also writes shards.

When a run names both `import` and `input`, the units of work are the input shards and every
embeddings/NNNNN.parquet must hold that tar's samples, in its order, as the embed stage would
have written it. The embeddings files are cut differently (clip-retrieval's parts follow its own
batches), so the stage routes rows to shards by key range (prune/io/key_ranges.py), in three task
passes and never through the driver:

1. per input shard: its samples, read as the embed stage reads them, staged as keys and statuses
   (only the first and last key go to the driver);
2. per embeddings part: its rows located in the shards' ranges and staged, sorted by shard with
   one Parquet row group per shard (a reader of one shard skips the others' row groups);
3. per input shard: its rows read from the parts that touched it and aligned to its keys; a key
   with no imported row gets status `no_imported_embedding` (counted with the failures).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from prune import schema
from prune.io.embeddings_in import ImportConfig, normalized, read_part, with_scores
from prune.io.key_ranges import KeyRanges
from prune.io.shards import read_shard
from prune.io.storage import OutputDir

SHARD_INDEX = "__shard"  # staged rows: the index of the input shard a row belongs to
VECTOR = "__vector"  # staged rows: the vector as stored (float32), normalized when aligned
TEXT_VECTOR = "__text_vector"  # staged rows: the caption's vector as stored, where the layout has them


def _vectors(unit: np.ndarray, ok: np.ndarray) -> pa.Array:
    flat = pa.array(np.where(ok[:, None], unit, 0).astype(np.float16).reshape(-1), pa.float16())
    return pa.FixedSizeListArray.from_arrays(flat, unit.shape[1], mask=pa.array(~ok))


def write_imported(out: OutputDir, shard: str, url: str, fp: str, model_id: str, keys: pa.Array, unit: np.ndarray,
                   ok: np.ndarray, status: np.ndarray, carried: pa.Table | None, shard_error: str = "",
                   text: tuple | None = None) -> None:
    """What the import stage makes of one unit of work, joined to a tar or not: embeddings/NNNNN.parquet
    (unit-norm float16, null where not ok, stamped like the embed stage's; with `text`, from
    `with_scores`, the captions' vectors and clip scores too) and, when columns are carried,
    imported/NNNNN.parquet."""
    dim = unit.shape[1]
    columns = {schema.KEY: keys, schema.SHARD: pa.array([shard] * len(keys), pa.string()),
               schema.STATUS: pa.array(status, pa.string()), schema.EMBEDDING: _vectors(unit, ok)}
    if text is not None:
        text_unit, text_ok, score = text
        columns |= {schema.TEXT_EMBEDDING: _vectors(text_unit, text_ok),
                    schema.CLIP_SCORE: pa.array(score, pa.float32(), mask=np.isnan(score))}
    table = pa.table(columns, schema=schema.embeddings_schema(dim, text[0].shape[1] if text is not None else None))
    if carried is not None and carried.num_columns:
        with out.open_atomic(schema.IMPORTED_DIR, schema.shard_file(shard)) as f:
            pq.write_table(carried.add_column(0, schema.KEY, keys), f)
    meta = {schema.META_EMBED_FINGERPRINT: fp.encode(), schema.META_MODEL_ID: model_id.encode(),
            schema.META_SOURCE_URL: url.encode()}
    if shard_error:  # the tar gave no sample: said as the embed stage says it
        meta[schema.META_SHARD_ERROR] = shard_error.encode()
    with out.open_atomic(schema.EMBEDDINGS_DIR, schema.shard_file(shard)) as f:
        pq.write_table(table.replace_schema_metadata(meta), f)


@dataclass(frozen=True)
class KeysTask:
    out: OutputDir
    shard: str
    url: str
    staging: str


def shard_range(task: KeysTask) -> dict:
    """One tar's samples, read as the embed stage reads them (keys, and the status of a sample the
    tar itself spoils), staged for the align pass; -> {shard, first, last, n} or {shard, error}."""
    read = read_shard(task.url, schema.IMAGE_EXTENSIONS_DEFAULT)
    if read.shard_error:
        return {"shard": task.shard, "error": f"{read.shard_error}: {read.detail}"[:500]}  # as the embed stage words it
    keys = [s.key for s in read.samples]
    table = pa.table({schema.KEY: pa.array(keys, pa.string()),
                      schema.STATUS: pa.array([s.status for s in read.samples], pa.string())})
    with task.out.open_atomic(task.staging, "keys", f"{task.shard}.parquet") as f:
        pq.write_table(table, f)
    return {"shard": task.shard, "first": min(keys), "last": max(keys), "n": len(keys)}


@dataclass(frozen=True)
class RouteTask:
    out: OutputDir
    part: str
    url: str
    settings: ImportConfig
    ranges: object  # KeyRanges (an ObjectRef shared by every task)
    staging: str


def route_part(task: RouteTask) -> dict:
    """One embeddings part -> its rows staged by shard; -> {part, shards: [index...], rows, dim}."""
    from .runtime import resolve

    ranges: KeyRanges = resolve(task.ranges)
    keys, vectors, carried, text = read_part(task.settings, task.url)
    rows, where = ranges.route(keys)  # grouped by shard; a row may go to more than one
    dim = vectors.shape[1]
    flat = pa.array(vectors[rows].reshape(-1), pa.float32())
    table = pa.table({schema.KEY: pa.array(keys, pa.string()).take(pa.array(rows)),
                      SHARD_INDEX: pa.array(where, pa.int32()),
                      VECTOR: pa.FixedSizeListArray.from_arrays(flat, max(dim, 1)) if dim else pa.nulls(len(rows))})
    if text is not None and text.size:
        table = table.append_column(TEXT_VECTOR, pa.FixedSizeListArray.from_arrays(
            pa.array(text[rows].reshape(-1), pa.float32()), text.shape[1]))
    for name in carried.column_names:
        table = table.append_column(name, carried.column(name).take(pa.array(rows)))
    touched, starts = np.unique(where, return_index=True)
    with task.out.open_atomic(task.staging, "parts", f"{task.part}.parquet") as f, pq.ParquetWriter(f, table.schema) as w:
        for start, end in zip(starts, [*starts[1:], len(rows)]):  # one row group per shard
            w.write_table(table.slice(int(start), int(end - start)))
    return {"part": task.part, "shards": touched.tolist(), "rows": len(keys), "dim": dim,
            "text": text is not None and bool(text.size)}


@dataclass(frozen=True)
class AlignTask:
    out: OutputDir
    shard: str
    index: int  # the shard's index in the KeyRanges
    url: str
    parts: tuple  # staged part names that hold rows of this shard
    staging: str
    fp: str
    model_id: str
    dim: int
    error: str = ""  # the tar could not be read: no sample at all
    with_text: bool = False  # the parts carry the captions' vectors


def align_shard(task: AlignTask) -> dict:
    """One input shard's embeddings/NNNNN.parquet (and imported/), rows in the tar's key order."""
    keys, tar_status = [], np.array([], object)
    if not task.error:
        with task.out.open(task.staging, "keys", f"{task.shard}.parquet") as f:
            listed = pq.read_table(f)
        keys = listed.column(schema.KEY).to_pylist()
        tar_status = listed.column(schema.STATUS).to_numpy(zero_copy_only=False)
    pieces = []
    for part in task.parts:
        with task.out.open(task.staging, "parts", f"{part}.parquet") as f:
            pieces.append(pq.read_table(f, filters=[(SHARD_INDEX, "=", task.index)]))
    rows = pa.concat_tables(pieces, promote_options="default") if pieces else None
    n, dim = len(keys), task.dim
    vectors = np.full((n, dim), np.nan, np.float32)
    text = np.full((n, dim), np.nan, np.float32) if task.with_text else None
    found = np.zeros(n, bool)
    carried = None
    if rows is not None and len(rows):
        at = pc.index_in(pa.array(keys, pa.string()), value_set=rows.column(schema.KEY))
        found = at.is_valid().to_numpy(zero_copy_only=False)
        idx = at.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        for column, into in ((VECTOR, vectors), (TEXT_VECTOR, text)):
            stored = rows.column(column).combine_chunks() if into is not None and column in rows.column_names else None
            if stored is not None and pa.types.is_fixed_size_list(stored.type):
                into[found] = stored.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)[idx[found]]
        carried = rows.drop_columns([c for c in (schema.KEY, SHARD_INDEX, VECTOR, TEXT_VECTOR) if c in rows.column_names]
                                    ).take(pa.array(idx, mask=~found))
    unit, ok = normalized(vectors)
    status = np.where(ok, schema.STATUS_OK, np.where(found, schema.STATUS_BAD_EMBEDDING, schema.STATUS_NO_IMPORTED))
    spoiled = tar_status != schema.STATUS_OK  # the tar's own word first: write could not copy these
    status, ok = np.where(spoiled, tar_status, status), ok & ~spoiled
    scored = with_scores(unit, ok, text)
    write_imported(task.out, task.shard, task.url, task.fp, task.model_id, pa.array(keys, pa.string()), unit, ok,
                   status, carried, task.error, scored)
    return {"samples": n, "matched": int(found.sum()), "invalid": int((status == schema.STATUS_BAD_EMBEDDING).sum()),
            "missing": int((status == schema.STATUS_NO_IMPORTED).sum()),
            "with_caption": int((~np.isnan(scored[2])).sum()) if scored is not None else 0}
