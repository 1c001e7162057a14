"""The writer: kept samples copied byte for byte into band-ordered shards with scored metadata."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from prune import schema
from prune.demo.shards import write_bad_shards, write_demo_shards
from prune.io.shards import split_member_name
from prune.io.storage import OutputDir
from prune.io.writer import (
    STAGING_COLUMNS,
    OutputShard,
    Piece,
    fragment_counts,
    plan_output_shards,
    read_fragment,
    write_fragments,
    write_output_shard,
)

PER_INPUT = 40
N_INPUT = 3
N_BANDS = 3
PER_OUTPUT = 7
STAGING = "_staging/write-test"


def tar_members(path) -> list[tuple[tarfile.TarInfo, bytes]]:
    """Every complete member, in order (a truncated tar gives those before the cut)."""
    out = []
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        try:
            for m in tar:
                if m.isfile():
                    data = tar.extractfile(m).read()
                    if len(data) == m.size:
                        out.append((m, data))
        except (tarfile.ReadError, OSError):
            pass
    return out


def as_table(kept: dict) -> pa.Table:
    """A selection's kept rows as the stage passes them (the scores' columns)."""
    columns = (schema.BAND, schema.CLUSTER, schema.DISTANCE, schema.PERCENTILE)
    return pa.Table.from_pydict({schema.KEY: list(kept), **{c: [v[c] for v in kept.values()] for c in columns}},
                                schema=pa.schema([schema.SCORES_SCHEMA.field(c) for c in (schema.KEY, *columns)]))


def make_kept(keys, rng, keep=0.6):
    """A made-up selection: which keys are kept, in which band, with which scores."""
    kept = {}
    for k in keys:
        if rng.random() < keep:
            kept[k] = {
                schema.BAND: int(rng.integers(0, N_BANDS)),
                schema.CLUSTER: int(rng.integers(0, 10)),
                schema.DISTANCE: float(np.float32(rng.uniform(0, 1))),
                schema.PERCENTILE: float(rng.uniform(0, 1)),
            }
    return kept


@pytest.fixture(scope="module", params=[False, True], ids=["ranges-of-the-input", "staged-bytes"])
def written(tmp_path_factory, request):
    """Demo shards + the mixed and truncated bad shards (no sidecar parquet), written as the pipeline
    does: output shards copying ranges of the input tars (local disks), or of staged fragment tars
    (object storage)."""
    root = tmp_path_factory.mktemp("writer")
    good = write_demo_shards(str(root / "in"), split="test", count=N_INPUT * PER_INPUT, shard_size=PER_INPUT, seed=4)
    bad = write_bad_shards(str(root / "in"), good[0])
    inputs = {schema.shard_id_of(p): p for p in good + [bad["mixed"]["path"], bad["truncated"]["path"]]}
    rng = np.random.default_rng(0)
    out = OutputDir(str(root / "out"))
    kept_by_shard, counts, results = {}, {}, {}
    for shard, path in sorted(inputs.items()):
        keys = list(dict.fromkeys(split_member_name(m.name)[0] for m, _ in tar_members(path)))
        kept = make_kept(keys, rng)
        # samples the writer's own read flags (unsafe names, cut short) are skipped even if asked for;
        # a sample without an image never has a score, so a selection cannot ask for it
        if shard == bad["mixed"]["shard"]:
            kept.update(make_kept([k for k, st in bad["mixed"]["expected"].items() if st == schema.STATUS_UNSAFE_NAME], rng, 1.0))
            kept.pop(next(k for k, st in bad["mixed"]["expected"].items() if st == schema.STATUS_NO_IMAGE), None)
        if shard == bad["truncated"]["shard"]:
            kept.update(make_kept([bad["truncated"]["truncated_key"]], rng, 1.0))
        kept_by_shard[shard] = kept
        res = write_fragments(path, shard, as_table(kept), out, STAGING, stage_bytes=request.param)
        results[shard] = res
        for band, n in res.counts.items():
            counts[(band, shard)] = n
    plans = plan_output_shards(counts, PER_OUTPUT)
    for plan in plans:
        assert write_output_shard(out, STAGING, schema.PRUNED_DIR, plan) == plan.count
    return {
        "root": root, "out": out, "inputs": inputs, "bad": bad, "kept": kept_by_shard,
        "counts": counts, "plans": plans, "results": results,
        "with_sidecar": {schema.shard_id_of(p) for p in good}, "stage_bytes": request.param,
    }


def output_tars(w):
    return [w["root"] / "out" / schema.PRUNED_DIR / p.name for p in w["plans"]]


def written_keys(w):
    """Input keys that must appear in the output: kept, and whole and safe in the tar."""
    unsafe_or_broken = {k for k, st in w["bad"]["mixed"]["expected"].items() if st == schema.STATUS_UNSAFE_NAME}
    unsafe_or_broken.add(w["bad"]["truncated"]["truncated_key"])
    return {
        (shard, k) for shard, kept in w["kept"].items() for k in kept if k not in unsafe_or_broken
    }


def test_every_kept_ok_sample_written_once(written):
    w = written
    seen = []
    for plan, path in zip(w["plans"], output_tars(w)):
        table = pq.read_table(str(path)[:-4] + ".parquet")
        seen += list(zip(table.column(schema.SOURCE_SHARD).to_pylist(), table.column(schema.KEY).to_pylist()))
    assert len(seen) == len(set(seen))
    assert set(seen) == written_keys(w)
    # a kept key that the reader flags (unsafe name, cut short) is never written
    mixed, cut = w["bad"]["mixed"], w["bad"]["truncated"]
    assert sum(w["results"][mixed["shard"]].counts.values()) == sum(
        1 for k in w["kept"][mixed["shard"]] if mixed["expected"][k] != schema.STATUS_UNSAFE_NAME
    )
    assert cut["truncated_key"] in w["kept"][cut["shard"]]
    assert sum(w["results"][cut["shard"]].counts.values()) == len(w["kept"][cut["shard"]]) - 1


def test_member_bytes_and_headers_identical_to_input(written):
    w = written
    source = {}
    for shard, path in w["inputs"].items():
        for info, data in tar_members(path):
            source[info.name] = (info, data)
    n = 0
    for path in output_tars(w):
        for info, data in tar_members(path):
            src_info, src_data = source[info.name]
            assert data == src_data, info.name
            assert (info.size, info.mtime, info.mode, info.uname, info.gname) == (
                src_info.size, src_info.mtime, src_info.mode, src_info.uname, src_info.gname)
            n += 1
    assert n > 0


def test_members_of_a_sample_adjacent_and_complete(written):
    w = written
    for path in output_tars(w):
        names = [info.name for info, _ in tar_members(path)]
        keys = [split_member_name(n)[0] for n in names]
        runs = [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]
        assert len(runs) == len(set(runs)), "a sample's members are split"
        for k in runs:
            exts = sorted(split_member_name(n)[1] for n in names if split_member_name(n)[0] == k)
            assert exts == ["jpg", "json", "txt"]


def test_shard_sizes_and_band_order(written):
    w = written
    plans = w["plans"]
    assert [p.name for p in plans] == [f"{i:05d}.tar" for i in range(len(plans))]
    bands = [p.band for p in plans]
    assert bands == sorted(bands)  # band-major: a prefix of the list is a smaller selection
    for i, p in enumerate(plans):
        last_of_band = i == len(plans) - 1 or plans[i + 1].band != p.band
        if not last_of_band:
            assert p.count == PER_OUTPUT
        else:
            assert 1 <= p.count <= PER_OUTPUT
    for b in set(bands):
        total = sum(n for (band, _), n in w["counts"].items() if band == b)
        assert sum(p.count for p in plans if p.band == b) == total
        assert sum(p.band == b for p in plans) == -(-total // PER_OUTPUT)


def test_shards_never_mix_bands_and_keep_input_order(written):
    w = written
    for plan, path in zip(w["plans"], output_tars(w)):
        table = pq.read_table(str(path)[:-4] + ".parquet")
        rows = list(zip(table.column(schema.SOURCE_SHARD).to_pylist(), table.column(schema.KEY).to_pylist()))
        assert {w["kept"][s][k][schema.BAND] for s, k in rows} == {plan.band}
        assert set(table.column(schema.BAND).to_pylist()) == {plan.band}
        stats = json.loads((path.parent / f"{path.name[:-4]}{schema.STATS_SUFFIX}").read_text())
        assert stats["count"] == stats["successes"] == plan.count == len(rows) and stats["band"] == plan.band
    # within a band: input shard order, then tar order
    for b in {p.band for p in w["plans"]}:
        rows = []
        for plan, path in zip(w["plans"], output_tars(w)):
            if plan.band == b:
                t = pq.read_table(str(path)[:-4] + ".parquet")
                rows += list(zip(t.column(schema.SOURCE_SHARD).to_pylist(), t.column(schema.KEY).to_pylist()))
        assert rows == sorted(rows, key=lambda r: (r[0], _tar_position(w, *r)))


def _tar_position(w, shard, key):
    cache = w.setdefault("_order", {})
    if shard not in cache:
        order = [split_member_name(m.name)[0] for m, _ in tar_members(w["inputs"][shard])]
        cache[shard] = {k: i for i, k in reversed(list(enumerate(order)))}
    return cache[shard][key]


def test_parquet_rows_match_tar_and_carry_scores(written):
    w = written
    for path in output_tars(w):
        table = pq.read_table(str(path)[:-4] + ".parquet")
        tar_keys = list(dict.fromkeys(split_member_name(i.name)[0] for i, _ in tar_members(path)))
        assert table.column(schema.KEY).to_pylist() == tar_keys  # one row per sample, same order
        for col in schema.SCORE_COLUMNS_IN_PRUNED + (schema.SOURCE_SHARD, "caption"):
            assert col in table.column_names
        assert not set(STAGING_COLUMNS) & set(table.column_names)  # where the bytes were: staging only
        assert [table.schema.field(c).type for c in schema.SCORE_COLUMNS_IN_PRUNED] == [pa.int64(), pa.float64(), pa.float64(), pa.int64()]
        for row in table.to_pylist():
            score = w["kept"][row[schema.SOURCE_SHARD]][row[schema.KEY]]
            for col in schema.SCORE_COLUMNS_IN_PRUNED:
                assert row[col] == pytest.approx(score[col])
            members = dict((split_member_name(i.name)[1], d) for i, d in tar_members(path) if split_member_name(i.name)[0] == row[schema.KEY])
            assert row["caption"] == members["txt"].decode()
            if row[schema.SOURCE_SHARD] in w["with_sidecar"]:
                # img2dataset sidecar columns come through from the input parquet
                assert row["url"].startswith("https://") and row["label_name"]
                assert row["sha256"] == json.loads(members["json"])["sha256"]


def test_sidecar_less_shard_gets_key_and_caption(written):
    w = written
    shard = w["bad"]["mixed"]["shard"]
    band = next(b for (b, s) in w["counts"] if s == shard)
    frag, source = read_fragment(w["out"], STAGING, shard, band)
    assert source == ("" if w["stage_bytes"] else w["inputs"][shard])
    assert frag.column_names[:2] == [schema.KEY, "caption"]
    assert "url" not in frag.column_names
    staged = sorted(p.name for p in (w["root"] / "out" / STAGING).rglob("*.tar"))
    assert bool(staged) == w["stage_bytes"]  # kept bytes staged only when asked to


def test_readable_by_webdataset(written):
    w = written
    urls = [str(p) for p in output_tars(w)]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == sum(p.count for p in w["plans"])
    for s in samples:
        assert {"jpg", "txt", "json"} <= set(s)
    # decoded by webdataset's own decoder: real images
    first = next(iter(wds.WebDataset(urls[:1], shardshuffle=False).decode("pil")))
    assert first["jpg"].size == (28, 28)


def test_no_temporaries_left_behind(written):
    w = written
    pruned = w["root"] / "out" / schema.PRUNED_DIR
    names = sorted(p.name for p in pruned.iterdir())
    stems = [p.name[:-4] for p in w["plans"]]
    assert names == sorted([f"{s}.tar" for s in stems] + [f"{s}.parquet" for s in stems] + [f"{s}{schema.STATS_SUFFIX}" for s in stems])
    assert not [p for p in (w["root"] / "out").rglob(".tmp-*")]


def test_nothing_kept_writes_nothing(tmp_path):
    (path,) = write_demo_shards(str(tmp_path / "in"), split="test", count=5, shard_size=5)
    out = OutputDir(str(tmp_path / "out"))
    res = write_fragments(path, "00000", as_table({}), out, STAGING)
    assert res.counts == {} and not (tmp_path / "out").exists()
    assert plan_output_shards({}, 10) == []


def test_a_tar_short_of_the_expected_samples_fails_before_writing(tmp_path):
    """The stage passes how many kept samples the scores name: a tar holding fewer (changed since it
    was scored) fails the task and leaves no fragment file that a retry would take as done."""
    (path,) = write_demo_shards(str(tmp_path / "in"), split="test", count=5, shard_size=5)
    keys = list(dict.fromkeys(split_member_name(m.name)[0] for m, _ in tar_members(path)))
    kept = {k: {schema.BAND: 0, schema.CLUSTER: 0, schema.DISTANCE: 0.5, schema.PERCENTILE: 0.5} for k in keys}
    out = OutputDir(str(tmp_path / "out"))
    with pytest.raises(RuntimeError, match="6 samples to keep, 5 found"):
        write_fragments(path, "00000", as_table(kept), out, STAGING, expected=len(kept) + 1)
    assert fragment_counts(out, STAGING, "00000") is None
    assert write_fragments(path, "00000", as_table(kept), out, STAGING, expected=len(kept)).counts == {0: 5}
    assert fragment_counts(out, STAGING, "00000") == {0: 5}


# --- the plan alone -------------------------------------------------------------------------


@pytest.mark.parametrize("per_shard", [1, 3, 10, 1000])
def test_plan_output_shards_properties(per_shard):
    rng = np.random.default_rng(per_shard)
    counts = {(int(b), f"{s:05d}"): int(rng.integers(1, 25)) for b in range(4) for s in range(6) if rng.random() < 0.8}
    plans = plan_output_shards(counts, per_shard)
    assert [p.index for p in plans] == list(range(len(plans)))
    covered: dict[tuple[int, str], list[Piece]] = {}
    for i, p in enumerate(plans):
        assert {piece.band for piece in p.pieces} == {p.band}
        last_of_band = i == len(plans) - 1 or plans[i + 1].band != p.band
        assert p.count == per_shard or (last_of_band and 0 < p.count < per_shard)
        for piece in p.pieces:
            assert 0 <= piece.start < piece.stop
            covered.setdefault((piece.band, piece.shard), []).append(piece)
    # every fragment is cut into consecutive slices that cover it exactly, in order
    assert set(covered) == set(counts)
    for key, pieces in covered.items():
        assert pieces[0].start == 0 and pieces[-1].stop == counts[key]
        assert all(a.stop == b.start for a, b in zip(pieces, pieces[1:]))
    # band-major, then input shard order
    order = [(piece.band, piece.shard) for p in plans for piece in p.pieces]
    assert order == sorted(order)


def test_output_shard_name_and_count():
    s = OutputShard(12, 2, [Piece(2, "00001", 0, 3), Piece(2, "00002", 5, 9)])
    assert s.name == "00012.tar" and s.count == 7
