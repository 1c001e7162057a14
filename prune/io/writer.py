"""Writing pruned shard sets: kept samples' members copied byte for byte, never decoded.

Two steps keep each input tar read exactly once and the output in band order; bytes move as
raw ranges (prune/io/tar_spans.py), never member by member:
  1. `write_fragments`: one pass over an input tar's headers puts each kept sample in the
     fragment of its distance band: its metadata row and its members' byte spans, in the input
     tar (local disks) or in a staged fragment tar of the kept members (object storage);
  2. `plan_output_shards` + `write_output_shard`: fragments are concatenated, band by band in
     input order, and cut into shards of N samples, each slice copied as byte ranges. Shards never mix bands, so the shards of bands 0..b (listed in bands.json) are a
     valid selection at that band's keep fraction.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from prune import schema
from prune.io.shards import read_sibling_metadata
from prune.io.storage import OutputDir, is_local, split_url
from prune.io.tar_spans import SampleSpans, copy_spans, finish_archive, read_member, sample_spans, scatter_spans

# staging only, never in the outputs: where each kept sample's members are, in which file
# ("": the band's fragment tar beside the parquet; else the input tar's URL)
SPAN_OFFSETS, SPAN_LENGTHS, SPAN_SOURCE = "_span_offsets", "_span_lengths", "_span_source"
STAGING_COLUMNS = (SPAN_OFFSETS, SPAN_LENGTHS, SPAN_SOURCE)


def fragment_name(band: int, shard: str, ext: str) -> str:
    return f"band{band:03d}/{shard}.{ext}"


def _caption(f, sample: SampleSpans) -> str | None:
    found = sample.member(("txt",))
    return read_member(f, found).decode("utf-8", "replace") if found else None


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
    tar_url: str, shard: str, kept: dict[str, dict], out: OutputDir, staging: str, stage_bytes: bool | None = None
) -> FragmentResult:
    """One input tar -> per band, the kept samples' metadata rows and where their bytes are.

    `kept` maps key -> {band, cluster, distance, percentile} for the kept samples only. The tar's
    headers are read once (`sample_spans`). Each fragment's parquet gives every sample's member
    spans (headers and padding included) in a source file: the input tar itself when it is on a
    local disk (the output shard reads those ranges: the kept bytes move once), or, with
    `stage_bytes` (the default on object storage: one sequential read per input, no small range
    reads), a fragment tar of the band's kept members, staged beside the parquet.
    """
    counts: dict[int, int] = {}
    if not kept:
        return FragmentResult(shard, counts)
    fs, path = split_url(tar_url)
    stage_bytes = not is_local(fs) if stage_bytes is None else stage_bytes
    with fs.open(path, "rb") as f:
        by_band: dict[int, list[SampleSpans]] = {}
        for sample in sample_spans(f):
            info = kept.get(sample.key)
            if info is not None and sample.ok:
                by_band.setdefault(int(info[schema.BAND]), []).append(sample)
        sidecar = read_sibling_metadata(tar_url) if by_band else None
        if stage_bytes:  # every band's fragment tar in one sequential pass over the input
            with contextlib.ExitStack() as stack:
                files = {band: stack.enter_context(out.open_atomic(staging, fragment_name(band, shard, "tar")))
                         for band in by_band}
                scatter_spans(f, [(offset, length, band) for band, samples in by_band.items()
                                  for sample in samples for offset, length in sample.spans], files)
        for band, samples in sorted(by_band.items()):
            if stage_bytes:  # the band's samples lie one after another in its fragment tar
                sizes = [sum(n for _, n in sample.spans) for sample in samples]
                ends = itertools.accumulate(sizes)
                spans, source = [[(end - size, size)] for end, size in zip(ends, sizes)], ""
            else:
                spans, source = [s.spans for s in samples], tar_url
            keys = [s.key for s in samples]
            meta = metadata_rows(shard, keys, lambda: [_caption(f, s) for s in samples], kept, sidecar)
            meta = meta.append_column(SPAN_OFFSETS, pa.array([[o for o, _ in sp] for sp in spans], pa.list_(pa.int64())))
            meta = meta.append_column(SPAN_LENGTHS, pa.array([[n for _, n in sp] for sp in spans], pa.list_(pa.int64())))
            meta = meta.append_column(SPAN_SOURCE, pa.array([source] * len(keys), pa.string()))
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


def _piece_spans(frag: pa.Table, start: int, stop: int) -> list[tuple[int, int]]:
    rows = frag.slice(start, stop - start)
    offsets = rows.column(SPAN_OFFSETS).combine_chunks().flatten().to_numpy()
    lengths = rows.column(SPAN_LENGTHS).combine_chunks().flatten().to_numpy()
    return list(zip(offsets.tolist(), lengths.tolist()))


def write_output_shard(out: OutputDir, staging: str, target_dir: str, plan: OutputShard) -> int:
    """Concatenate the planned fragment slices into one shard, with its parquet and stats.

    Each slice's samples are copied as byte ranges of their source (adjacent ranges merged: a
    staged fragment's slice is one range). The tar is written last: a shard whose tar exists is
    complete, metadata included.
    """
    stem = plan.name[: -len(".tar")]
    tables, copies = [], []
    for p in plan.pieces:
        with out.open(staging, fragment_name(p.band, p.shard, "parquet")) as f:
            frag = pq.read_table(f)
        source = frag.column(SPAN_SOURCE)[0].as_py() if len(frag) else ""
        copies.append((p, source, _piece_spans(frag, p.start, p.stop)))
        tables.append(frag.drop_columns(list(STAGING_COLUMNS)).slice(p.start, p.stop - p.start))
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
        for p, source, spans in copies:
            if source:  # the input tar itself
                fs, path = split_url(source)
                src = fs.open(path, "rb")
            else:
                src = out.open(staging, fragment_name(p.band, p.shard, "tar"))
            with src:
                written += copy_spans(src, fobj, spans)
        finish_archive(fobj, written)
    return n
