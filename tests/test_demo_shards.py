"""The demo shards look like img2dataset's output and carry the real Fashion-MNIST data;
the bad-input fixtures are broken in exactly the way they claim."""

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image, UnidentifiedImageError

from prune import schema
from prune.demo.fashion_mnist import CLASS_NAMES, load_fashion_mnist
from prune.demo.shards import caption_for, write_bad_shards, write_demo_shards

COUNT, SHARD_SIZE = 30, 12  # three shards: 12, 12, 6


@pytest.fixture(scope="module")
def source():
    return load_fashion_mnist("test")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, write_demo_shards(str(out), split="test", count=COUNT, shard_size=SHARD_SIZE, seed=3)


def read_tar(path):
    """[(member name, bytes)] in tar order."""
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def decode(data):
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.mode, np.asarray(im)


def test_load_fashion_mnist(source):
    images, labels = source
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [1000] * 10  # the test split is balanced
    assert len(CLASS_NAMES) == 10 and CLASS_NAMES[7] == "sneaker"


def test_missing_files_name_the_file_and_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz.*apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("test", root=str(tmp_path))
    with pytest.raises(ValueError):
        load_fashion_mnist("validation")


def test_layout_and_atomic_writes(shards):
    out, tars = shards
    assert [os.path.basename(t) for t in tars] == ["00000.tar", "00001.tar", "00002.tar"]
    expected = {f"0000{i}{ext}" for i in range(3) for ext in (".tar", ".parquet", schema.STATS_SUFFIX)}
    assert set(os.listdir(out)) == expected  # no temporary files left behind


def test_webdataset_reads_the_real_images(shards, source):
    _, tars = shards
    images, labels = source
    samples = list(wds.WebDataset(tars, shardshuffle=False))
    assert len(samples) == COUNT
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == COUNT and all(len(k) == 9 and k.isdigit() for k in keys)
    for s in samples:
        assert s["__key__"][:5] == schema.shard_id_of(s["__url__"])
        meta = json.loads(s["json"])
        mode, pixels = decode(s["jpg"])
        assert mode == "L" and pixels.shape == (28, 28)  # kept grayscale: the pipeline converts
        source_pixels = images[meta["index"]].astype(int)
        assert np.abs(pixels.astype(int) - source_pixels).max() <= 32  # JPEG q95 tolerance
        assert np.abs(pixels.astype(int) - source_pixels).mean() < 2
        assert meta["key"] == s["__key__"]
        assert meta["label"] == labels[meta["index"]]
        assert meta["label_name"] == CLASS_NAMES[meta["label"]]
        assert meta["caption"] == s["txt"].decode()
        assert meta["url"] == f"https://example.invalid/fmnist/test/{meta['index']}.jpg"
        assert meta["sha256"] == hashlib.sha256(s["jpg"]).hexdigest()
        assert (meta["status"], meta["split"], meta["width"], meta["height"]) == ("success", "test", 28, 28)
        assert meta["caption"] == caption_for(meta["label_name"])
    assert caption_for("ankle boot") == "a photo of an ankle boot"
    assert caption_for("sneaker") == "a photo of a sneaker"


def test_members_of_a_sample_are_adjacent(shards):
    _, tars = shards
    names = [name for name, _ in read_tar(tars[0])]
    assert len(names) == 3 * SHARD_SIZE
    for i in range(SHARD_SIZE):
        key = f"00000{i:04d}"
        assert names[3 * i : 3 * i + 3] == [f"{key}.jpg", f"{key}.txt", f"{key}.json"]


def test_parquet_and_stats_match_the_tar(shards):
    _, tars = shards
    for tar_path in tars:
        stem = tar_path[: -len(".tar")]
        tar_keys = [name.split(".")[0] for name, _ in read_tar(tar_path) if name.endswith(".jpg")]
        table = pq.read_table(stem + ".parquet")
        assert table.num_rows == len(tar_keys)
        assert table.column("key").to_pylist() == tar_keys
        for column in ["url", "caption", "status", "error_message", "width", "height", "original_width",
                       "original_height", "exif", "sha256", "label", "label_name", "index"]:
            assert column in table.column_names
        stats = json.loads(Path(stem + schema.STATS_SUFFIX).read_text())
        assert stats["count"] == stats["successes"] == len(tar_keys)
        assert stats["failed_to_download"] == stats["failed_to_resize"] == 0
        assert stats["status_dict"] == {"success": len(tar_keys)}
        assert stats["end_time"] >= stats["start_time"] and stats["duration"] >= 0
    assert [pq.read_metadata(t[:-4] + ".parquet").num_rows for t in tars] == [12, 12, 6]


def test_same_arguments_give_identical_tars(shards, tmp_path):
    _, tars = shards
    again = write_demo_shards(str(tmp_path), split="test", count=COUNT, shard_size=SHARD_SIZE, seed=3)
    for a, b in zip(tars, again):
        assert Path(a).read_bytes() == Path(b).read_bytes()


# The plain demo shards' digests (split="test", count=30, shard_size=12, seed=3): demo-data without
# --web-like writes the same bytes release after release (the web-like pool's captions, in
# prune/demo/captions.py, must not touch it); a change here is a change of every demo fingerprint.
PLAIN_DIGESTS = [
    "cb993fcef02f0e9f66977870d2f72b778596720bcced531de64fa1a1279a1e9b",
    "59d9b9cb375a25db2f270f761ff43e7f620f834eb2752619737922cfa5721cd9",
    "3d137f2031d803eb423221e4d4dff47602068dad0f338c10489691fb71d2c4c9",
]


def test_plain_shards_are_the_same_bytes_as_ever(shards):
    _, tars = shards
    assert [hashlib.sha256(Path(t).read_bytes()).hexdigest() for t in tars] == PLAIN_DIGESTS
    for t in tars:
        for name, data in read_tar(t):
            if name.endswith(".json"):
                meta = json.loads(data)
                assert "caption_kind" not in meta and meta["caption"] == caption_for(meta["label_name"])


def test_start_ranges_are_disjoint_slices_of_one_permutation(tmp_path):
    def indices(sub, **kw):
        tars = write_demo_shards(str(tmp_path / sub), split="test", shard_size=10, seed=1, **kw)
        return [json.loads(data)["index"] for t in tars for name, data in read_tar(t) if name.endswith(".json")]

    first, second = indices("a", count=15, start=0), indices("b", count=15, start=15)
    assert not set(first) & set(second)
    assert first + second == indices("c", count=30, start=0)


def test_png_is_lossless(tmp_path, source):
    images, _ = source
    (tar,) = write_demo_shards(str(tmp_path), split="test", count=5, shard_size=5, image_format="png")
    members = dict(read_tar(tar))
    for name, data in members.items():
        if name.endswith(".png"):
            meta = json.loads(members[name.replace(".png", ".json")])
            assert np.array_equal(decode(data)[1], images[meta["index"]])


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError):
        write_demo_shards(str(tmp_path), split="test", count=10, start=9_995)
    with pytest.raises(ValueError):
        write_demo_shards(str(tmp_path), split="test", count=10, shard_size=10_001)
    with pytest.raises(ValueError):
        write_demo_shards(str(tmp_path), split="test", count=10, image_format="gif")


@pytest.fixture(scope="module")
def bad(shards):
    out, tars = shards
    return write_bad_shards(str(out), tars[0])


def test_bad_shards_take_the_next_numbers(bad):
    assert [bad[k]["shard"] for k in ("mixed", "truncated", "not_a_tar")] == ["00003", "00004", "00005"]
    for fixture in bad.values():
        assert schema.shard_id_of(fixture["path"]) == fixture["shard"]


def test_mixed_tar_is_what_it_claims(bad):
    expected = bad["mixed"]["expected"]
    members = read_tar(bad["mixed"]["path"])
    by_key = {}
    for name, data in members:
        key, ext = name.rsplit(".", 1)
        by_key.setdefault(key, {})[ext] = data
    assert set(by_key) == set(expected)
    statuses = sorted(expected.values())
    assert statuses.count(schema.STATUS_OK) >= 3
    assert statuses.count(schema.STATUS_UNDECODABLE) == 2
    assert statuses.count(schema.STATUS_UNSAFE_NAME) == 2
    assert set(statuses) <= {schema.STATUS_OK, *schema.FAILURE_STATUSES}

    assert expected["../escape"] == expected["/abs/evil"] == schema.STATUS_UNSAFE_NAME
    names = [name for name, _ in members]
    assert "../escape.jpg" in names and "/abs/evil.jpg" in names

    for key, status in expected.items():
        sample = by_key[key]
        if status == schema.STATUS_OK:
            assert decode(sample["jpg"])[1].shape == (28, 28)
            assert json.loads(sample["json"])["key"] == key
        elif status == schema.STATUS_EMPTY:
            assert sample["jpg"] == b"" and "txt" in sample
        elif status == schema.STATUS_NO_IMAGE:
            assert set(sample) == {"txt", "json"}
        elif status == schema.STATUS_UNDECODABLE:
            with pytest.raises((OSError, UnidentifiedImageError)):
                decode(sample["jpg"])
        elif status == schema.STATUS_UNSAFE_NAME:
            assert set(sample) == {"jpg"}
    corrupt = [by_key[k]["jpg"] for k, s in expected.items() if s == schema.STATUS_UNDECODABLE]
    assert any(data.startswith(b"\xff\xd8") for data in corrupt)  # real JPEG bytes, cut short
    assert any(data.startswith(b"<html>") for data in corrupt)  # text saved as .jpg


def test_truncated_tar_fails_on_full_read_after_the_intact_samples(bad):
    fixture = bad["truncated"]
    assert os.path.getsize(fixture["path"]) == fixture["cut_at"]
    with pytest.raises(tarfile.ReadError):
        read_tar(fixture["path"])
    with pytest.raises(Exception):
        list(wds.WebDataset(fixture["path"], shardshuffle=False))
    seen = []  # what a streaming reader gets before the error
    with pytest.raises(tarfile.ReadError):
        with tarfile.open(fixture["path"], mode="r|") as tar:
            for member in tar:
                tar.extractfile(member).read()
                seen.append(member.name)
    complete = fixture["complete_keys"]
    assert complete and {name.split(".")[0] for name in seen} == set(complete)
    assert fixture["expected"][fixture["truncated_key"]] == schema.STATUS_TRUNCATED


def test_not_a_tar_is_rejected(bad):
    path = bad["not_a_tar"]["path"]
    assert bad["not_a_tar"]["shard_status"] == schema.SHARD_NOT_A_TAR
    assert not tarfile.is_tarfile(path)
    with pytest.raises(tarfile.ReadError):
        tarfile.open(path)
