"""Writing pruned shard sets: kept samples' members copied byte for byte, never decoded.

Two steps keep each input tar read exactly once and the output in band order:
  1. `write_fragments`: one pass over an input tar sends each kept sample to the fragment of
     its distance band (a tar plus its metadata rows) under the staging directory;
  2. `plan_output_shards` + `write_output_shard`: fragments are concatenated, band by band in
     input order, and cut into shards of N samples. Shards never mix bands, so the shards of
     bands 0..b (listed in bands.json) are a valid selection at that band's keep fraction.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from prune import schema
from prune.io.shards import TarSample, iter_tar_samples, read_sibling_metadata
from prune.io.storage import OutputDir, split_url


def fragment_name(band: int, shard: str, ext: str) -> str:
    return f"band{band:03d}/{shard}.{ext}"


def _copy_info(info: tarfile.TarInfo) -> tarfile.TarInfo:
    out = tarfile.TarInfo(info.name)
    out.size, out.mtime, out.mode = info.size, info.mtime, info.mode
    out.uid, out.gid, out.uname, out.gname = info.uid, info.gid, info.uname, info.gname
    return out


def add_sample(tar: tarfile.TarFile, sample: TarSample) -> None:
    for info, data in sample.members:
        tar.addfile(_copy_info(info), io.BytesIO(data))


def _caption(sample: TarSample) -> str | None:
    found = sample.member(("txt",))
    return found[1].decode("utf-8", "replace") if found else None


def metadata_rows(
    shard: str, samples: list[TarSample], kept: dict[str, dict], sidecar: pa.Table | None
) -> pa.Table:
    """img2dataset metadata rows of the kept samples (sidecar columns when present) + scores."""
    keys = [s.key for s in samples]
    if sidecar is not None and schema.KEY in sidecar.column_names:
        index = {k: i for i, k in enumerate(sidecar.column(schema.KEY).to_pylist())}
        rows = [index.get(k, -1) for k in keys]
        if all(r >= 0 for r in rows):
            table = sidecar.take(pa.array(rows, pa.int64()))
        else:
            table = pa.table({schema.KEY: keys, "caption": [_caption(s) for s in samples]})
    else:
        table = pa.table({schema.KEY: keys, "caption": [_caption(s) for s in samples]})
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
    """Stream one input tar once; each kept sample goes to its band's fragment, verbatim.

    `kept` maps key -> {band, cluster, distance, percentile} for the kept samples only.
    """
    by_band: dict[int, list[TarSample]] = {}
    fs, path = split_url(tar_url)
    if kept:
        with fs.open(path, "rb") as f:
            for sample in iter_tar_samples(f):
                info = kept.get(sample.key)
                if info is not None and sample.status == schema.STATUS_OK:
                    by_band.setdefault(int(info[schema.BAND]), []).append(sample)
    sidecar = read_sibling_metadata(tar_url) if by_band else None
    counts = {}
    for band, samples in sorted(by_band.items()):
        with out.open_atomic(staging, fragment_name(band, shard, "tar")) as fobj:
            with tarfile.open(fileobj=fobj, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for s in samples:
                    add_sample(tar, s)
        meta = metadata_rows(shard, samples, kept, sidecar)
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

    The tar is written last: a shard whose tar exists is complete, metadata included.
    """
    stem = plan.name[: -len(".tar")]
    tables = []
    for p in plan.pieces:
        with out.open(staging, fragment_name(p.band, p.shard, "parquet")) as f:
            tables.append(pq.read_table(f).slice(p.start, p.stop - p.start))
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
        with tarfile.open(fileobj=fobj, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for p in plan.pieces:
                with out.open(staging, fragment_name(p.band, p.shard, "tar")) as f:
                    for i, sample in enumerate(iter_tar_samples(f)):
                        if i >= p.stop:
                            break
                        if i >= p.start:
                            add_sample(tar, sample)
    return n
