"""Id exports of the kept set, for users who re-shard or re-download rather than copy tars:
DataComp's subset file (its resharder's `--subset-file`) and a Parquet of the kept samples'
ids (with `url` and `caption` when the input has them, as img2dataset re-downloads want)."""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from prune import schema
from prune.settings import PLACEMENT, NonEmptyStr, Section

FORMAT_PARQUET, FORMAT_DATACOMP = "parquet", "datacomp"
DATACOMP_FILE = "datacomp_subset.npy"
UID_DTYPE = np.dtype("u8,u8")  # DataComp: a 128-bit uid as two unsigned 64-bit halves


class ExportConfig(Section):
    """The `export` section: which id identifies a sample, which formats to write."""

    # the column of the input's img2dataset parquet that identifies a sample (DataComp: uid);
    # "key" is the sample key, always there
    id_col: NonEmptyStr = schema.KEY
    # parquet: export/ids/, the kept samples' ids per input shard; datacomp: export/datacomp_subset.npy,
    # the kept uids as DataComp's resharder reads them (--subset-file)
    formats: list[Literal["parquet", "datacomp"]] = [FORMAT_PARQUET]
    # columns of the input parquet carried beside the id when the input has them
    columns: list[str] = ["url", "caption"]
    # DataComp's file gathers every kept uid (16 bytes each) in one process: this bounds it (a bound:
    # the file is the same whatever it is)
    max_datacomp_rows: Annotated[int, PLACEMENT] = Field(2_000_000_000, ge=1)


def uid_pairs(uids) -> tuple[np.ndarray, list]:
    """128-bit hex uids -> (DataComp's structured (high, low) uint64 pairs, in input order; the
    values that are not 32 hex digits, left out and returned so the caller can count them).
    Vectorized: a shard's uids are checked by one regex pass and decoded by one `bytes.fromhex`."""
    arr = pa.array(uids, pa.string())
    valid = pc.fill_null(pc.match_substring_regex(arr, r"^[0-9a-fA-F]{32}$"), False).to_numpy(zero_copy_only=False)
    bad = arr.filter(pa.array(~valid)).to_pylist()
    hexes = "".join(arr.filter(pa.array(valid)).to_pylist())
    halves = np.frombuffer(bytes.fromhex(hexes), dtype=">u8").astype(np.uint64).reshape(-1, 2)
    pairs = np.empty(len(halves), UID_DTYPE)
    pairs["f0"], pairs["f1"] = halves[:, 0], halves[:, 1]
    return pairs, bad


def subset_file(parts: list[np.ndarray]) -> np.ndarray:
    """The subset file's array: every shard's pairs, sorted as DataComp's resharder expects."""
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, UID_DTYPE)


def missing_id_col(shard: str, metadata: pa.Table | None, id_col: str) -> str | None:
    """Why the shard's parquet cannot give `id_col` (None: it can, or the id is the key)."""
    if id_col == schema.KEY or (metadata is not None and id_col in metadata.column_names):
        return None
    have = f"its columns: {', '.join(metadata.column_names)}" if metadata is not None else "no parquet beside the tar"
    return f"export.id_col {id_col!r} is not a column of shard {shard}'s parquet ({have})"


def id_column(keys: pa.Array, metadata: pa.Table | None, id_col: str) -> pa.Array:
    """Each key's `id_col` value from the shard's metadata, in the keys' order (the first row of
    a key that appears twice); null where the metadata has no row, or no such column."""
    if metadata is None or id_col not in metadata.column_names:
        return pa.nulls(len(keys), pa.string())
    where = pc.index_in(keys.cast(pa.string()), value_set=metadata.column(schema.KEY).cast(pa.string()))
    return metadata.column(id_col).combine_chunks().take(where)


def kept_ids(shard: str, scores: pa.Table, metadata: pa.Table | None, cfg: ExportConfig) -> pa.Table:
    """One input shard's kept samples: key, shard, the id column and the carried columns (from
    the img2dataset parquet beside the tar, joined on key), with distance, cluster and band."""
    kept = scores.filter(scores.column(schema.KEEP))
    table = pa.table({
        schema.KEY: kept.column(schema.KEY),
        schema.SHARD: pa.array([shard] * len(kept), pa.string()),
        schema.DISTANCE: kept.column(schema.DISTANCE),
        schema.CLUSTER: kept.column(schema.CLUSTER),
        schema.BAND: kept.column(schema.BAND),
    })
    wanted = [c for c in dict.fromkeys([cfg.id_col, *cfg.columns]) if c != schema.KEY]
    missing = missing_id_col(shard, metadata, cfg.id_col)
    if missing:
        raise ValueError(missing)
    carried = [c for c in wanted if metadata is not None and c in metadata.column_names]
    if carried:
        meta = metadata.select([schema.KEY, *carried])
        table = table.join(meta, schema.KEY, join_type="left outer").sort_by(schema.KEY)
    return table
