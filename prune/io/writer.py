"""Writing pruned shard sets: kept samples' members copied byte for byte, never decoded.

Two steps keep each input tar read exactly once and the output in band order; bytes move as
raw ranges (prune/io/tar_spans.py), never member by member:
  1. `write_fragments`: one pass over an input tar sends each kept sample's members, headers
     included, to the fragment of its distance band (a tar body plus its metadata rows) under
     the staging directory;
  2. `plan_output_shards` + `write_output_shard`: fragments are concatenated, band by band in
     input order, and cut into shards of N samples, a slice of a fragment being one byte
     range. Shards never mix bands, so the shards of bands 0..b (listed in bands.json) are a
     valid selection at that band's keep fraction.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from prune import schema
from prune.io.shards import read_sibling_metadata
from prune.io.storage import OutputDir, split_url
from prune.io.tar_spans import SampleSpans, copy_spans, finish_archive, sample_spans

FRAGMENT_END = "_fragment_end"  # staging only: byte offset where each sample ends in its fragment tar


def fragment_name(band: int, shard: str, ext: str) -> str:
    return f"band{band:03d}/{shard}.{ext}"


def _caption(f, sample: SampleSpans) -> str | None:
    found = sample.member(("txt",))
    if found is None:
        return None
    f.seek(found.data_at)
    return f.read(found.size).decode("utf-8", "replace")


def metadata_rows(
    shard: str, keys: list[str], captions, kept: dict[str, dict], sidecar: pa.Table | None
) -> pa.Table:
    """img2dataset metadata rows of the kept samples (sidecar columns when present) + scores.
    `captions()`: the samples' .txt captions, read only when there is no sidecar to take them from."""
    if sidecar is not None and schema.KEY in sidecar.column_names:
        index = {k: i for i, k in enumerate(sidecar.column(schema.KEY).to_pylist())}
        rows = [index.get(k, -1) for k in keys]
        if all(r >= 0 for r in rows):
            table = sidecar.take(pa.array(rows, pa.int64()))
        else:
            table = pa.table({schema.KEY: keys, "caption": captions()})
    else:
        table = pa.table({schema.KEY: keys, "caption": captions()})
    table = table.append_column(schema.SOURCE_SHARD, pa.array([shard] * len(keys), pa.string()))
    for name in schema.SCORE_COLUMNS_IN_PRUNED:
        if name in table.column_names:
            table = table.drop_columns([name])
        table = table.append_column(name, pa.array([kept[k][name] for k in keys]))
    return table


@dataclass
class FragmentResult:
    shard: str
    counts: dict[int, int]  # band -> samples written


def write_fragments(
    tar_url: str, shard: str, kept: dict[str, dict], out: OutputDir, staging: str
) -> FragmentResult:
    """One input tar -> each kept sample's members, raw, in its band's fragment.

    `kept` maps key -> {band, cluster, distance, percentile} for the kept samples only. The tar's
    headers are read once (`sample_spans`); the kept members' bytes are copied as they are
    stored, headers and padding included. Each fragment's parquet records where every sample
    ends in the fragment tar, so an output shard copies a slice of it as one byte range.
    """
    counts: dict[int, int] = {}
    if not kept:
        return FragmentResult(shard, counts)
    fs, path = split_url(tar_url)
    with fs.open(path, "rb") as f:
        by_band: dict[int, list[SampleSpans]] = {}
        for sample in sample_spans(f):
            info = kept.get(sample.key)
            if info is not None and sample.ok:
                by_band.setdefault(int(info[schema.BAND]), []).append(sample)
        sidecar = read_sibling_metadata(tar_url) if by_band else None
        for band, samples in sorted(by_band.items()):
            ends, written = [], 0
            with out.open_atomic(staging, fragment_name(band, shard, "tar")) as fobj:
                for sample in samples:
                    written += copy_spans(f, fobj, sample.spans)
                    ends.append(written)
            keys = [s.key for s in samples]
            meta = metadata_rows(shard, keys, lambda: [_caption(f, s) for s in samples], kept, sidecar)
            meta = meta.append_column(FRAGMENT_END, pa.array(ends, pa.int64()))
            with out.open_atomic(staging, fragment_name(band, shard, "parquet")) as fobj:
                pq.write_table(meta, fobj)
            counts[band] = len(samples)
    return FragmentResult(shard, counts)


@dataclass
class Piece:
    band: int
    shard: str
    start: int
    stop: int


@dataclass
class OutputShard:
    index: int
    band: int
    pieces: list[Piece]

    @property
    def name(self) -> str:
        return schema.pruned_shard_name(self.index)

    @property
    def count(self) -> int:
        return sum(p.stop - p.start for p in self.pieces)


def plan_output_shards(counts: dict[tuple[int, str], int], per_shard: int) -> list[OutputShard]:
    """Band-major, input-ordered concatenation of fragments cut into shards of `per_shard`."""
    shards: list[OutputShard] = []
    for band in sorted({b for b, _ in counts}):
        current: list[Piece] = []
        filled = 0
        for (b, shard), n in sorted(counts.items()):
            if b != band:
                continue
            start = 0
            while start < n:
                take = min(n - start, per_shard - filled)
                current.append(Piece(band, shard, start, start + take))
                start += take
                filled += take
                if filled == per_shard:
                    shards.append(OutputShard(len(shards), band, current))
                    current, filled = [], 0
        if current:
            shards.append(OutputShard(len(shards), band, current))
    return shards


def write_output_shard(out: OutputDir, staging: str, target_dir: str, plan: OutputShard) -> int:
    """Concatenate the planned fragment slices into one shard, with its parquet and stats.

    Each slice is one byte range of its fragment tar (`FRAGMENT_END` says where samples end).
    The tar is written last: a shard whose tar exists is complete, metadata included.
    """
    stem = plan.name[: -len(".tar")]
    tables, ranges = [], []
    for p in plan.pieces:
        with out.open(staging, fragment_name(p.band, p.shard, "parquet")) as f:
            frag = pq.read_table(f)
        ends = frag.column(FRAGMENT_END).to_pylist()
        start = ends[p.start - 1] if p.start else 0
        ranges.append((p, start, ends[p.stop - 1] - start))
        tables.append(frag.drop_columns([FRAGMENT_END]).slice(p.start, p.stop - p.start))
    table = pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
    with out.open_atomic(target_dir, schema.shard_file(stem)) as fobj:
        pq.write_table(table, fobj)
    n = plan.count
    out.write_json(
        {
            "count": n,
            "successes": n,
            "failed_to_download": 0,
            "failed_to_resize": 0,
            "status_dict": {"success": n},
            "band": plan.band,
        },
        target_dir,
        f"{stem}{schema.STATS_SUFFIX}",
    )
    with out.open_atomic(target_dir, plan.name) as fobj:
        written = 0
        for p, start, length in ranges:
            with out.open(staging, fragment_name(p.band, p.shard, "tar")) as f:
                written += copy_spans(f, fobj, [(start, length)])
        finish_archive(fobj, written)
    return n
