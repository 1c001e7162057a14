"""Each input tar's TarIndex, recorded where the tar is read whole anyway (the embed stage's read
tasks) and used by the write stage instead of walking the tar's headers a second time.

One Arrow IPC file per input shard (`tar_index/NNNNN.arrow`): a row per sample, its members'
names and positions as lists. It carries the tar's stamp (this format's version, the tar's path,
size, and mtime or the object store's version tag), taken before the read and checked after it:
an index whose stamp is not the tar's own now is ignored and the writer walks the headers as
before, so a changed tar, or an index from another input of the same shard id, cannot mislead
it. A tar whose store reports no version, or a compressed one, gets no index.
"""

from __future__ import annotations

from typing import Optional

import fsspec
import numpy as np
import pyarrow as pa

from prune import schema
from prune.io.shards import TarSample
from prune.io.storage import OutputDir, split_url
from prune.io.tar_spans import CompressedTar, TarIndex, ensure_uncompressed, index_of_reader, tar_index

_STAMP = b"ssl_prune_tar_stamp"
_FORMAT = "tar-index-v1"  # a change to what the index holds or means changes this: older ones are ignored
_READER_OK = (schema.STATUS_OK, schema.STATUS_NO_IMAGE)  # the reader's own ok (no image: a later check)
# what changes when an object is replaced: local mtime; S3, GCS and Azure versions and ETags
_VERSION_FIELDS = ("mtime", "ETag", "etag", "generation", "version_id", "VersionId", "LastModified", "last_modified", "updated")


def tar_stamp(fs: fsspec.AbstractFileSystem, path: str) -> Optional[str]:
    """Which tar, as it is now (asked afresh, not from a listing cache); None: its store reports
    no version of it, so no index can be trusted for it."""
    fs.invalidate_cache(path)
    info = fs.info(path)
    version = next((str(info[k]) for k in _VERSION_FIELDS if info.get(k) not in (None, "")), None)
    return None if version is None else f"{_FORMAT}|{path}|{info.get('size')}|{version}"


def index_of_read(samples: list[TarSample]) -> TarIndex:
    """The TarIndex of a tar from `read_shard`'s samples: the same as the header walk's (a sample
    without image is ok to the reader; `read_shard` only marks it after)."""
    return index_of_reader(samples, _READER_OK)


def _file(shard: str) -> str:
    return schema.shard_file(shard).replace(".parquet", ".arrow")


def _save_if_unchanged(out: OutputDir, shard: str, url: str, stamp_before: Optional[str], index: TarIndex) -> bool:
    """Save `index` unless the tar's stamp is no longer `stamp_before` (None: no version to trust)."""
    if stamp_before is None or tar_stamp(*split_url(url)) != stamp_before:
        return False
    save_index(out, shard, index, stamp_before)
    return True


def record_index(out: OutputDir, shard: str, url: str, stamp_before: Optional[str], samples: list[TarSample]) -> bool:
    """Save the index of a tar just read (`stamp_before`: its stamp before the read) unless the tar
    changed meanwhile, its store reports no version, or it is compressed. -> whether it was saved."""
    fs, path = split_url(url)
    try:
        with fs.open(path, "rb") as f:
            ensure_uncompressed(f)
    except CompressedTar:
        return False
    return _save_if_unchanged(out, shard, url, stamp_before, index_of_read(samples))


def index_for(out: OutputDir, shard: str, url: str, f) -> TarIndex:
    """Where the samples of the tar at `url` (`f`: it, open) lie: its recorded index when that is
    this tar's as it is now, else a walk over its headers, recorded for the next reader. Raises
    CompressedTar for a compressed tar, whatever an index says."""
    ensure_uncompressed(f)
    index = load_index(out, shard, url)
    if index is not None:
        return index
    fs, path = split_url(url)
    before = tar_stamp(fs, path)
    index = tar_index(f)
    try:
        _save_if_unchanged(out, shard, url, before, index)
    except Exception:  # noqa: BLE001 - a shortcut for later readers, never worth failing this one
        pass
    return index


def save_index(out: OutputDir, shard: str, index: TarIndex, stamp: str) -> None:
    offsets = pa.array(index.bounds, pa.int64())
    lists = {name: pa.LargeListArray.from_arrays(offsets, pa.array(values)) for name, values in (
        ("names", index.names), ("header_at", index.header_at), ("data_at", index.data_at), ("sizes", index.sizes))}
    table = pa.table({"key": index.keys, "ok": index.ok, **lists}).replace_schema_metadata({_STAMP: stamp})
    with out.open_atomic(schema.TAR_INDEX_DIR, _file(shard)) as f, pa.ipc.new_file(f, table.schema) as writer:
        writer.write_table(table)


def load_index(out: OutputDir, shard: str, url: str) -> Optional[TarIndex]:
    """The shard's recorded index if it is the index of the tar at `url` as it is now; None
    otherwise (absent, stale, another tar's, damaged): the caller walks the tar instead."""
    try:
        if not out.exists(schema.TAR_INDEX_DIR, _file(shard)):
            return None  # first: a run without indexes pays no stamp (a request per tar on object stores)
        with out.open(schema.TAR_INDEX_DIR, _file(shard)) as f:
            table = pa.ipc.open_file(pa.py_buffer(f.read())).read_all()
        stamp = tar_stamp(*split_url(url))
        if stamp is None or (table.schema.metadata or {}).get(_STAMP, b"").decode() != stamp:
            return None
        return _from_table(table)
    except Exception:  # noqa: BLE001 - a damaged index only costs a walk over the headers
        return None


def _from_table(table: pa.Table) -> TarIndex:
    if not len(table):
        return TarIndex.from_samples([])
    table = table.combine_chunks()

    def flat(name: str) -> pa.Array:  # a list column's values, every sample's in turn
        return table.column(name).chunk(0).values

    bounds = table.column("sizes").chunk(0).offsets.to_numpy().astype(np.int64)
    index = TarIndex(table.column("key").to_pylist(), table.column("ok").to_pylist(), bounds, flat("names").to_pylist(),
                     *(flat(name).to_numpy().astype(np.int64) for name in ("header_at", "data_at", "sizes")))
    n = len(index.names)
    if bounds[0] != 0 or bounds[-1] != n or np.any(np.diff(bounds) < 0) or not (len(index.header_at) == len(index.data_at) == n):
        raise ValueError("an index whose columns do not line up")
    return index
