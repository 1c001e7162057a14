"""Reading and building the per-shard Parquet tables of the output directory (prune/schema.py).

Every stage that reads embeddings or writes scores goes through these, so the columns and their
null conventions are handled in one place.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from prune import schema
from prune.io.shards import read_sibling_metadata
from prune.io.storage import OutputDir


def read_parquet(f, columns=None) -> pa.Table:
    """One Parquet file, whole or some columns: `ParquetFile.read` skips the dataset layer that
    `pq.read_table` builds for every call (half the time of a per-shard file's read)."""
    return pq.ParquetFile(f).read(columns=columns)


def read_embeddings(out: OutputDir, shard: str, columns=None) -> pa.Table:
    with out.open(schema.EMBEDDINGS_DIR, schema.shard_file(shard)) as f:
        return read_parquet(f, columns)


def read_scores(out: OutputDir, shard: str, columns=None) -> pa.Table:
    with out.open(schema.SCORES_DIR, schema.shard_file(shard)) as f:
        return read_parquet(f, columns)


def read_assignment(out: OutputDir, shard: str, columns=None) -> pa.Table:
    with out.open(schema.ASSIGN_DIR, schema.shard_file(shard)) as f:
        return read_parquet(f, columns)


def read_removals(out: OutputDir, stage: str, shard: str, columns=(schema.KEY, schema.STATUS)) -> pa.Table:
    """One curation stage's removals of one shard (`columns`: None for all of them)."""
    with out.open(schema.removals_dir(stage), schema.shard_file(shard)) as f:
        return read_parquet(f, None if columns is None else list(columns))


def after_removals(out: OutputDir, shard: str, keys, status, removals) -> np.ndarray:
    """The statuses of a shard's samples once the curation stages `removals` (in order) removed
    theirs: a sample ok so far takes the reason of the first stage that removed it. A reason that
    is ok or a failure status is a stage's bug, and an error."""
    status = np.asarray(status, dtype=object).copy()
    for stage in removals:
        table = read_removals(out, stage, shard)
        if not len(table):
            continue
        reasons = table.column(schema.STATUS).to_numpy(zero_copy_only=False)
        if not schema.is_removal(reasons).all():
            raise ValueError(f"removals/{stage}/{schema.shard_file(shard)}: a removal's reason must be neither "
                             f"{schema.STATUS_OK!r} nor a failure status, found {sorted(set(reasons))}")
        at = pc.index_in(pa.array(keys, pa.string()), value_set=table.column(schema.KEY))
        found = at.is_valid().to_numpy(zero_copy_only=False)
        idx = at.fill_null(0).to_numpy(zero_copy_only=False)
        hit = found & (status == schema.STATUS_OK)
        status[hit] = reasons[idx[hit]]
    return status


def surviving(out: OutputDir, shard: str, removals, columns=(schema.KEY, schema.STATUS)) -> tuple[pa.Table, np.ndarray]:
    """A shard's assignment (`columns`, KEY and STATUS among them) with the statuses the curation
    stages `removals` give (`after_removals`); -> (that table, its statuses). What select and every
    curation stage start from."""
    table = read_assignment(out, shard, list(columns) if columns is not None else None)
    assigned = table.column(schema.STATUS).to_numpy(zero_copy_only=False)
    if not removals:
        return table, assigned
    status = after_removals(out, shard, table.column(schema.KEY).to_numpy(zero_copy_only=False), assigned, removals)
    if not (status == assigned).all():
        table = table.set_column(table.schema.get_field_index(schema.STATUS), schema.STATUS, pa.array(status, pa.string()))
    return table, status


def counts_by_reason(reasons) -> dict:
    """How many removals of each reason (a curation stage's per-shard counts)."""
    values, counts = np.unique(np.asarray(reasons, dtype=object).astype(str), return_counts=True)
    return {str(v): int(n) for v, n in zip(values, counts)}


def write_removals(out: OutputDir, stage: str, shard: str, table: pa.Table, fp: str) -> None:
    """A curation stage's removals of one shard (KEY and STATUS first), stamped with its fingerprint."""
    if table.schema.names[:2] != schema.REMOVAL_SCHEMA.names:
        raise ValueError(f"removals of {stage!r} must start with the columns {schema.REMOVAL_SCHEMA.names}")
    with out.open_atomic(schema.removals_dir(stage), schema.shard_file(shard)) as f:
        pq.write_table(table.replace_schema_metadata({schema.META_REMOVALS_FINGERPRINT: fp.encode()}), f)


def file_metadata(out: OutputDir, directory: str, shard: str) -> dict:
    """A per-shard Parquet file's schema metadata (its footer only); empty if the file is absent."""
    return file_footer(out, directory, shard)[0]


def file_footer(out: OutputDir, directory: str, shard: str) -> tuple[dict, int]:
    """A per-shard Parquet file's (schema metadata, row count), from its footer; ({}, 0) if absent."""
    if not out.exists(directory, schema.shard_file(shard)):
        return {}, 0
    with out.open(directory, schema.shard_file(shard)) as f:
        md = pq.read_metadata(f)
    return md.schema.to_arrow_schema().metadata or {}, md.num_rows


def ok_matrix(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(mask of ok rows, float32 [n_ok, d]) from an embeddings table."""
    ok = np.asarray(table.column(schema.STATUS).to_numpy(zero_copy_only=False) == schema.STATUS_OK)
    col = table.column(schema.EMBEDDING).combine_chunks()
    dim = col.type.list_size
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    full = flat.reshape(-1, dim) if len(flat) else np.zeros((0, dim), np.float32)
    # flatten() skips null lists; failed rows are null, so `full` holds exactly the ok rows
    return ok, full


def npy_bytes(arr: np.ndarray) -> bytes:
    b = io.BytesIO()
    np.save(b, arr)
    return b.getvalue()


def load_centroids(out: OutputDir) -> np.ndarray:
    with out.open(schema.PROTOTYPES_DIR, schema.CENTROIDS_FILE) as f:
        return np.load(f)


def assignment(table: pa.Table, cluster, distance, ok) -> pa.Table:
    """The assignment of an embeddings table (assign/): its ids and statuses, each ok sample's
    cluster and distance (null for the others)."""
    return pa.table({
        schema.KEY: table.column(schema.KEY),
        schema.SHARD: table.column(schema.SHARD),
        schema.STATUS: table.column(schema.STATUS),
        schema.CLUSTER: pa.array(cluster, pa.int32()),
        schema.DISTANCE: pa.array(distance, pa.float32(), mask=~ok),
    }, schema=schema.ASSIGN_SCHEMA)


def shard_metadata(out: OutputDir, shard: str, url: str):
    """The sample metadata of a unit of work: img2dataset's parquet beside the tar, or what the
    import stage carried from precomputed embeddings (imported/NNNNN.parquet); None: neither."""
    metadata = read_sibling_metadata(url)
    return metadata if metadata is not None else imported_metadata(out, shard)


def imported_metadata(out: OutputDir, shard: str):
    """What the import stage carried for a unit of work (imported/NNNNN.parquet), or None."""
    if not out.exists(schema.IMPORTED_DIR, schema.shard_file(shard)):
        return None
    with out.open(schema.IMPORTED_DIR, schema.shard_file(shard)) as f:
        return pq.read_table(f)
