"""prune/demo/photos.py: web-photo-like JPEGs in img2dataset shards, the same bytes for a seed."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
from PIL import Image

from prune import schema
from prune.demo.photos import MAX_SIDE, MIN_SIDE, write_photo_shards
from prune.io.shards import read_shard


def test_photo_shards_are_img2dataset_shards_of_web_sized_jpegs(tmp_path):
    tars = write_photo_shards(str(tmp_path / "a"), count=12, shard_size=5, seed=1, processes=1)
    assert [t.rsplit("/", 1)[1] for t in tars] == ["00000.tar", "00001.tar", "00002.tar"]
    samples = [s for t in tars for s in read_shard(t, ["jpg"]).samples]
    assert [s.key for s in samples[:6]] == ["000000000", "000000001", "000000002", "000000003", "000000004",
                                            "000010000"]
    assert all(s.status == schema.STATUS_OK for s in samples) and len(samples) == 12
    for s in samples:
        img = Image.open(io.BytesIO(s.member(["jpg"])[1]))
        assert img.format == "JPEG" and img.mode == "RGB"
        assert MIN_SIDE <= max(img.size) <= MAX_SIDE and min(img.size) >= MIN_SIDE * 3 // 4
        meta = json.loads(s.member(["json"])[1])
        assert (meta["key"], meta["width"], meta["height"]) == (s.key, *img.size)
        assert s.member(["txt"])[1].decode() == meta["caption"]
    rows = pq.read_table(tars[2].replace(".tar", ".parquet"))
    assert rows.column("key").to_pylist() == ["000020000", "000020001"]
    assert json.load(open(tars[2].replace(".tar", "_stats.json")))["count"] == 2


def test_the_same_seed_gives_the_same_bytes_in_any_number_of_processes(tmp_path):
    one = write_photo_shards(str(tmp_path / "one"), count=70, shard_size=40, seed=2, processes=1)
    two = write_photo_shards(str(tmp_path / "two"), count=70, shard_size=40, seed=2, processes=2)
    assert [open(a, "rb").read() for a in one] == [open(b, "rb").read() for b in two]
    other = write_photo_shards(str(tmp_path / "other"), count=70, shard_size=40, seed=3, processes=1)
    assert open(other[0], "rb").read() != open(one[0], "rb").read()
