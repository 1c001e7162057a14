"""The tar index the embed stage's reads record, and the writer's use of it instead of a header walk."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pytest

from prune import schema
from prune.demo.shards import write_bad_shards, write_demo_shards
from prune.io.shards import read_shard
from prune.io.storage import OutputDir, split_url
from prune.io.tar_index_cache import index_of_read, load_index, save_index, tar_stamp
from prune.io.tar_spans import tar_index
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


def test_an_index_comes_back_only_for_its_own_tar(tars, tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    path = next(iter(tars.values()))
    index = index_of_read(read_shard(path, ("jpg",)).samples)
    assert load_index(out, "00000", _stamp(path)) is None  # none recorded
    save_index(out, "00000", index, _stamp(path))
    loaded = load_index(out, "00000", _stamp(path))
    assert loaded.samples() == index.samples() and loaded.keys == index.keys
    np.testing.assert_array_equal(loaded.bounds, index.bounds)
    assert load_index(out, "00000", "another tar's stamp") is None
    copy = tmp_path / "changed.tar"
    shutil.copy(path, copy)
    with open(copy, "ab") as f:  # the same tar, grown: another size, another stamp
        f.write(b"\0" * 512)
    assert _stamp(str(copy)) != _stamp(path) and load_index(out, "00000", _stamp(str(copy))) is None
    empty = index_of_read([])
    save_index(out, "00001", empty, "s")
    assert load_index(out, "00001", "s").samples() == []


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
        save_index(indexed_out, shard, index_of_read(read_shard(path, ("jpg",)).samples), _stamp(path))
    assert _write_all(indexed_out, tars, kept) == walked and any(name.endswith(".tar") for name in walked)
    # a stale index (another tar's samples under this shard's name) is not used: the bytes stay right
    stale_out = OutputDir(str(tmp_path / "stale"))
    first, second = sorted(tars)[:2]
    save_index(stale_out, first, index_of_read(read_shard(tars[second], ("jpg",)).samples), "a stamp of long ago")
    assert _write_all(stale_out, tars, kept) == walked
