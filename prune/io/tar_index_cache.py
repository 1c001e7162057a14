"""Each input tar's TarIndex, recorded where the tar is read whole anyway (the embed stage's read
tasks) and used by the write stage instead of walking the tar's headers a second time.

One Arrow IPC file per input shard (`tar_index/NNNNN.arrow`): a row per sample, its members'
names and positions as lists. It carries the tar's stamp (path, size, and mtime or ETag): an
index whose stamp is not the tar's own now is ignored and the writer walks the headers as before, so
a changed tar, or an index from another input of the same shard id, can never mislead it.
"""

from __future__ import annotations

import fsspec
import numpy as np
import pyarrow as pa

from prune import schema
from prune.io.shards import TarSample
from prune.io.storage import OutputDir
from prune.io.tar_spans import MemberSpan, SampleSpans, TarIndex

_STAMP = b"ssl_prune_tar_stamp"
_READER_OK = (schema.STATUS_OK, schema.STATUS_NO_IMAGE)  # the reader's own ok (no image: a later check)


def tar_stamp(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Which tar, as it is now: its path, its size, and its mtime (local) or ETag (object stores)."""
    info = fs.info(path)
    return f"{path}|{info.get('size')}|{info.get('ETag') or info.get('mtime') or info.get('LastModified') or ''}"


def index_of_read(samples: list[TarSample]) -> TarIndex:
    """The TarIndex of a tar from its reader's samples (`read_shard`): the same as the header walk's."""
    return TarIndex.from_samples([
        SampleSpans(s.key, [MemberSpan(i.name, i.offset, i.offset_data, i.size) for i, _ in s.members],
                    s.status in _READER_OK)
        for s in samples
    ])


def _file(shard: str) -> str:
    return schema.shard_file(shard).replace(".parquet", ".arrow")


def save_index(out: OutputDir, shard: str, index: TarIndex, stamp: str) -> None:
    offsets = pa.array(index.bounds, pa.int64())
    lists = {name: pa.LargeListArray.from_arrays(offsets, pa.array(values)) for name, values in (
        ("names", index.names), ("header_at", index.header_at), ("data_at", index.data_at), ("sizes", index.sizes))}
    table = pa.table({"key": index.keys, "ok": index.ok, **lists}).replace_schema_metadata({_STAMP: stamp})
    with out.open_atomic(schema.TAR_INDEX_DIR, _file(shard)) as f, pa.ipc.new_file(f, table.schema) as writer:
        writer.write_table(table)


def load_index(out: OutputDir, shard: str, stamp: str) -> TarIndex | None:
    """The shard's recorded index if its stamp is `stamp`; None otherwise (absent, stale, unreadable)."""
    try:
        if not out.exists(schema.TAR_INDEX_DIR, _file(shard)):
            return None
        with out.open(schema.TAR_INDEX_DIR, _file(shard)) as f:
            table = pa.ipc.open_file(pa.py_buffer(f.read())).read_all()
    except (OSError, pa.ArrowInvalid):
        return None
    if (table.schema.metadata or {}).get(_STAMP, b"").decode() != stamp:
        return None
    if not len(table):
        return TarIndex.from_samples([])
    table = table.combine_chunks()

    def flat(name: str) -> pa.Array:  # a list column's values, every sample's in turn
        return table.column(name).chunk(0).values

    return TarIndex(table.column("key").to_pylist(), table.column("ok").to_pylist(),
                    table.column("sizes").chunk(0).offsets.to_numpy().astype(np.int64), flat("names").to_pylist(),
                    *(flat(name).to_numpy().astype(np.int64) for name in ("header_at", "data_at", "sizes")))
