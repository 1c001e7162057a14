"""The tar index the embed stage's reads record, and the writer's use of it instead of a header walk."""

from __future__ import annotations

import gzip
import os
import shutil

import numpy as np
import pyarrow as pa
import pytest

from prune import schema
from prune.demo.shards import write_bad_shards, write_demo_shards
from prune.io import tar_index_cache
from prune.io.shards import read_shard
from prune.io.storage import OutputDir, split_url
from prune.io.tar_index_cache import index_of_read, load_index, record_index, save_index, tar_stamp
from prune.io.tar_spans import CompressedTar, tar_index
from prune.io.writer import plan_output_shards, write_fragments, write_output_shard

STAGING = "_staging/write-test"


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    root = tmp_path_factory.mktemp("tars")
    good = write_demo_shards(str(root / "in"), split="test", count=60, shard_size=20, seed=2)
    bad = write_bad_shards(str(root / "in"), good[0])
    return {schema.shard_id_of(p): p for p in good + [bad["mixed"]["path"], bad["truncated"]["path"]]}


def _stamp(path: str) -> str:
    return tar_stamp(*split_url(path))


def test_the_readers_index_is_the_header_walks(tars):
    """What read_shard's samples give (the embed stage's read) equals the writer's own walk, on clean
    shards and on damaged ones (unsafe names, a sample without image, a tar cut short)."""
    for path in tars.values():
        with open(path, "rb") as f:
            walked = tar_index(f)
        recorded = index_of_read(read_shard(path, ("jpg",)).samples)
        assert recorded.samples() == walked.samples()


def test_an_index_comes_back_only_for_its_own_tar_as_it_was_read(tars, tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    path = str(tmp_path / "00000.tar")
    shutil.copy(next(iter(tars.values())), path)
    samples = read_shard(path, ("jpg",)).samples
    assert load_index(out, "00000", path) is None  # none recorded
    assert record_index(out, "00000", path, _stamp(path), samples)
    loaded = load_index(out, "00000", path)
    assert loaded.samples() == index_of_read(samples).samples() and loaded.keys == [s.key for s in samples]
    other = str(tmp_path / "other.tar")
    shutil.copy(path, other)
    assert load_index(out, "00000", other) is None  # the same bytes elsewhere: another tar
    with open(path, "ab") as f:  # the tar itself changed after it was read
        f.write(b"\0" * 512)
    assert load_index(out, "00000", path) is None
    # a tar changed during its read (the stamp taken before it is no longer the tar's) is not recorded
    assert not record_index(out, "00001", path, "stamp before the change", samples)
    assert load_index(out, "00001", path) is None
    save_index(out, "00002", index_of_read([]), _stamp(path))
    assert load_index(out, "00002", path).samples() == []
    (tmp_path / "out" / schema.TAR_INDEX_DIR / "00002.arrow").write_bytes(b"not arrow")
    assert load_index(out, "00002", path) is None  # damaged: the caller walks


def test_a_compressed_tar_gets_no_index_and_an_index_does_not_let_it_through(tars, tmp_path):
    """The reader opens a gzipped tar transparently, but its offsets count the decompressed stream:
    no index is recorded for it, and even an index stamped with it does not get it written."""
    raw = open(next(iter(tars.values())), "rb").read()
    path = str(tmp_path / "00000.tar")
    with open(path, "wb") as f:
        f.write(gzip.compress(raw))
    samples = read_shard(path, ("jpg",)).samples
    assert samples and samples[0].status == schema.STATUS_OK  # read fine
    out = OutputDir(str(tmp_path / "out"))
    assert not record_index(out, "00000", path, _stamp(path), samples)
    save_index(out, "00000", index_of_read(samples), _stamp(path))  # as if it had been recorded
    with pytest.raises(CompressedTar):
        write_fragments(path, "00000", _kept(path, np.random.default_rng(1)), out, STAGING)


def _write_all(out: OutputDir, tars: dict, kept: dict) -> dict:
    """Every shard's fragments, then the output shards: -> file name -> bytes of pruned/."""
    counts = {}
    for shard, path in sorted(tars.items()):
        for band, n in write_fragments(path, shard, kept[shard], out, STAGING, stage_bytes=False).counts.items():
            counts[(band, shard)] = n
    for plan in plan_output_shards(counts, 7):
        write_output_shard(out, STAGING, schema.PRUNED_DIR, plan)
    pruned = out.path(schema.PRUNED_DIR)
    return {name: open(os.path.join(pruned, name), "rb").read() for name in sorted(os.listdir(pruned))}


def _kept(path: str, rng) -> pa.Table:
    keys = [s.key for s in read_shard(path, ("jpg",)).samples if s.status == schema.STATUS_OK]
    keys = [k for k in keys if rng.random() < 0.6]
    return pa.table({schema.KEY: keys, schema.BAND: pa.array(rng.integers(0, 3, len(keys)), pa.int32()),
                     schema.CLUSTER: pa.array(rng.integers(0, 5, len(keys)), pa.int32()),
                     schema.DISTANCE: pa.array(rng.random(len(keys)), pa.float32()),
                     schema.PERCENTILE: pa.array(rng.random(len(keys)), pa.float64())})


def test_the_writer_gives_the_same_bytes_with_a_recorded_index_and_ignores_a_stale_one(tars, tmp_path):
    rng = np.random.default_rng(0)
    kept = {shard: _kept(path, rng) for shard, path in tars.items()}
    walked = _write_all(OutputDir(str(tmp_path / "walked")), tars, kept)
    indexed_out = OutputDir(str(tmp_path / "indexed"))
    for shard, path in tars.items():
        assert record_index(indexed_out, shard, path, _stamp(path), read_shard(path, ("jpg",)).samples)

    def no_walk(f):
        raise AssertionError("the writer walked a tar whose index it had")

    with pytest.MonkeyPatch.context() as mp:  # the index is what the writer used: it never walks
        mp.setattr(tar_index_cache, "tar_index", no_walk)
        assert _write_all(indexed_out, tars, kept) == walked and any(name.endswith(".tar") for name in walked)
    # a stale index (another tar's samples under this shard's name) is not used: the bytes stay right
    stale_out = OutputDir(str(tmp_path / "stale"))
    first, second = sorted(tars)[:2]
    save_index(stale_out, first, index_of_read(read_shard(tars[second], ("jpg",)).samples), "a stamp of long ago")
    assert _write_all(stale_out, tars, kept) == walked
    # a write that had to walk recorded what it found: the next reader of these tars does not walk
    walked_out = OutputDir(str(tmp_path / "walked"))
    for shard, path in tars.items():
        with open(path, "rb") as f:
            assert load_index(walked_out, shard, path).samples() == tar_index(f).samples()
