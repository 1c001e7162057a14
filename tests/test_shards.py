"""Reading img2dataset tars: samples grouped as webdataset groups them, damage recorded per sample."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from prune import schema
from prune.demo.shards import DEMO_MTIME, tar_bytes, write_bad_shards, write_demo_shards
from prune.embed.decode import PreprocessSpec, decode_image
from prune.io.shards import (
    is_unsafe_member,
    iter_tar_samples,
    read_shard,
    read_sibling_metadata,
    sibling_path,
    split_member_name,
)
from prune.io.storage import list_input_shards

EXTS = tuple(schema.IMAGE_EXTENSIONS_DEFAULT)
PER_SHARD = 10


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    good = write_demo_shards(str(d), split="test", count=3 * PER_SHARD, shard_size=PER_SHARD, seed=2)
    bad = write_bad_shards(str(d), good[0])
    return {"dir": d, "good": good, "bad": bad}


def members_of(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


# --- good shards ----------------------------------------------------------------------------


def test_demo_shard_samples_and_members(demo):
    for path in demo["good"]:
        result = read_shard(path, EXTS)
        assert result.shard_error is None
        raw = members_of(path)
        assert len(result.samples) == PER_SHARD
        # every member, in tar order, with its bytes, under the right sample
        flat = [(info.name, data) for s in result.samples for info, data in s.members]
        assert flat == raw
        shard = schema.shard_id_of(path)
        for s in result.samples:
            assert s.status == schema.STATUS_OK
            assert s.key.startswith(shard) and len(s.key) == 9
            assert sorted(split_member_name(i.name)[1] for i, _ in s.members) == ["jpg", "json", "txt"]
            ext, image = s.member(EXTS)
            assert ext == "jpg" and image == dict(raw)[f"{s.key}.jpg"]
            assert s.member(("png",)) is None
        # the sidecar parquet lists the same keys in the same order
        meta = read_sibling_metadata(path)
        assert meta.column("key").to_pylist() == [s.key for s in result.samples]


def test_keys_match_webdataset_on_the_demo_shards(demo):
    ours = [(s.key, sorted(split_member_name(i.name)[1] for i, _ in s.members))
            for p in demo["good"] for s in read_shard(p, EXTS).samples]
    theirs = [(s["__key__"], sorted(k for k in s if not k.startswith("__")))
              for s in wds.WebDataset(demo["good"], shardshuffle=False)]
    assert ours == theirs


# --- the bad fixtures -----------------------------------------------------------------------


def test_mixed_fixture_every_key_and_status(demo):
    """The reader finds structural damage; decoding finds the rest. Together: the expected map."""
    fx = demo["bad"]["mixed"]
    result = read_shard(fx["path"], EXTS)
    assert result.shard_error is None
    assert [s.key for s in result.samples] == list(fx["expected"])
    for s in result.samples:
        status = s.status
        if status == schema.STATUS_OK:
            _, data = s.member(EXTS)
            _, status = decode_image(data, PreprocessSpec(size=32))
        assert status == fx["expected"][s.key], s.key
    unsafe = [s for s in result.samples if s.status == schema.STATUS_UNSAFE_NAME]
    assert {s.key for s in unsafe} == {"../escape", "/abs/evil"}
    assert all(not s.members for s in unsafe)  # an unsafe member's bytes are never kept
    no_image = [s for s in result.samples if s.status == schema.STATUS_NO_IMAGE]
    assert len(no_image) == 1 and sorted(split_member_name(i.name)[1] for i, _ in no_image[0].members) == ["json", "txt"]


def test_truncated_fixture(demo):
    fx = demo["bad"]["truncated"]
    assert os.path.getsize(fx["path"]) == fx["cut_at"]
    result = read_shard(fx["path"], EXTS)
    assert result.shard_error is None
    assert {s.key: s.status for s in result.samples} == fx["expected"]
    assert [s.key for s in result.samples if s.status == schema.STATUS_OK] == fx["complete_keys"]
    assert result.samples[-1].key == fx["truncated_key"]
    for s in result.samples[:-1]:  # the complete ones are whole and decodable
        assert len(s.members) == 3
        assert decode_image(s.member(EXTS)[1], PreprocessSpec(size=32))[1] == schema.STATUS_OK


def test_not_a_tar(demo):
    fx = demo["bad"]["not_a_tar"]
    result = read_shard(fx["path"], EXTS)
    assert result.shard_error == schema.SHARD_NOT_A_TAR == fx["shard_status"]
    assert result.samples == [] and result.detail


def test_empty_file_is_not_a_tar(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"")
    assert read_shard(str(tmp_path / "00000.tar"), EXTS).shard_error == schema.SHARD_NOT_A_TAR


def test_missing_file_is_unreadable(tmp_path):
    result = read_shard(str(tmp_path / "nope.tar"), EXTS)
    assert result.shard_error == schema.SHARD_UNREADABLE and result.samples == []


# --- truncation anywhere --------------------------------------------------------------------


def _small_tar():
    members = [(f"00000000{i}.{ext}", bytes([i]) * size) for i in range(3) for ext, size in (("jpg", 700), ("txt", 20))]
    data = tar_bytes(members)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        infos = tar.getmembers()
    return data, infos


def test_cut_in_a_member_header_or_between_members_is_truncation():
    """tarfile stops quietly at a cut header; the missing end-of-archive block gives it away."""
    data, infos = _small_tar()
    txt1 = infos[3]  # 000000001.txt
    for cut in (txt1.offset, txt1.offset + 100, txt1.offset_data + 5):  # at, inside, after its header
        samples = list(iter_tar_samples(io.BytesIO(data[:cut])))
        assert [(s.key, s.status) for s in samples] == [("000000000", schema.STATUS_OK), ("000000001", schema.STATUS_TRUNCATED)], cut
        assert [i.name for i, _ in samples[1].members] == ["000000001.jpg"]


def test_end_of_archive_block_decides_completeness():
    data, infos = _small_tar()
    end = infos[-1].offset_data + 512  # the last member's data, padded to a block
    whole = list(iter_tar_samples(io.BytesIO(data)))
    assert [s.status for s in whole] == [schema.STATUS_OK] * 3
    one_zero_block = list(iter_tar_samples(io.BytesIO(data[: end + 512])))
    assert [s.status for s in one_zero_block] == [schema.STATUS_OK] * 3
    no_end_block = list(iter_tar_samples(io.BytesIO(data[:end])))
    assert [s.status for s in no_end_block] == [schema.STATUS_OK] * 2 + [schema.STATUS_TRUNCATED]


def test_garbage_header_mid_archive_is_truncation():
    data, infos = _small_tar()
    bad = bytearray(data)
    bad[infos[2].offset + 120] ^= 0xFF  # breaks the checksum of 000000001.jpg's header
    samples = list(iter_tar_samples(io.BytesIO(bytes(bad))))
    assert [(s.key, s.status) for s in samples] == [("000000000", schema.STATUS_TRUNCATED)]


def test_every_cut_position_keeps_only_whole_samples_ok():
    """Cut anywhere: a sample reported ok has all its members, byte for byte."""
    data, infos = _small_tar()
    originals = {i.name: bytes([int(i.name[8])]) * i.size for i in infos}
    for cut in range(512, len(data), 97):
        try:
            samples = list(iter_tar_samples(io.BytesIO(data[:cut])))
        except tarfile.ReadError:
            assert cut < 512 + 700  # only before the first member is complete
            continue
        for s in samples:
            if s.status == schema.STATUS_OK:
                assert [i.name for i, _ in s.members] == [f"{s.key}.jpg", f"{s.key}.txt"], cut
                assert all(d == originals[i.name] for i, d in s.members)
        assert sum(s.status == schema.STATUS_TRUNCATED for s in samples) <= 1


# --- grouping and names ---------------------------------------------------------------------

TRICKY = [
    "000000000.jpg",
    "000000000.txt",
    "000000001.seg.png",  # multi-part extension
    "000000001.JPG",  # upper case
    "dir.v2/000000002.jpg",  # a dot in the directory
    "dir.v2/000000002.json",
    "a/b/000000003.webp",
    "a/b/000000003.cls",
    "x/.hidden.jpg",  # empty stem: webdataset's key is "x/"
    "000000004.tar.gz",
    "000000004.txt",
    "000000000.extra",  # the key again, not adjacent: a new group
]


@pytest.mark.parametrize("name", TRICKY)
def test_split_member_name_equals_webdataset(name):
    assert split_member_name(name) == base_plus_ext(name)


def test_grouping_equals_webdataset_on_a_real_tar(tmp_path):
    path = tmp_path / "00007.tar"
    path.write_bytes(tar_bytes([(n, n.encode()) for n in TRICKY]))
    ours = read_shard(str(path), EXTS).samples
    theirs = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s.key for s in ours] == [s["__key__"] for s in theirs]
    for a, b in zip(ours, theirs):
        assert sorted(split_member_name(i.name)[1].lower() for i, _ in a.members) == sorted(
            k for k in b if not k.startswith("__")
        )
        for info, data in a.members:
            assert b[split_member_name(info.name)[1].lower()] == data
    by_key = {s.key: s for s in ours[:-1]}
    assert by_key["000000001"].member(EXTS) == ("jpg", b"000000001.JPG")  # extension case ignored
    assert by_key["000000004"].status == schema.STATUS_NO_IMAGE  # .tar.gz is not an image
    assert ours[-1].key == "000000000" and ours[-1].status == schema.STATUS_DUPLICATE_KEY


def test_directories_are_skipped_and_links_are_unsafe(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        d = tarfile.TarInfo("shard")
        d.type, d.mtime = tarfile.DIRTYPE, DEMO_MTIME
        tar.addfile(d)
        for name in ("shard/000000000.jpg", "shard/000000000.txt"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
        link = tarfile.TarInfo("shard/000000001.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        hard = tarfile.TarInfo("shard/000000002.jpg")
        hard.type, hard.linkname = tarfile.LNKTYPE, "shard/000000000.jpg"
        tar.addfile(hard)
    samples = list(iter_tar_samples(io.BytesIO(buf.getvalue())))
    assert [(s.key, s.status) for s in samples] == [
        ("shard/000000000", schema.STATUS_OK),
        ("shard/000000001", schema.STATUS_UNSAFE_NAME),
        ("shard/000000002", schema.STATUS_UNSAFE_NAME),
    ]
    assert samples[1].members == [] and samples[2].members == []


@pytest.mark.parametrize(
    "name, unsafe",
    [
        ("000000000.jpg", False),
        ("a/b/000000000.jpg", False),
        ("a..b.jpg", False),  # dots, but not a parent reference
        ("../x.jpg", True),
        ("a/../../x.jpg", True),
        ("/etc/x.jpg", True),
        ("\\\\server\\x.jpg", True),
        ("C:x.jpg", True),
        ("a\\..\\x.jpg", True),
    ],
)
def test_is_unsafe_member(name, unsafe):
    assert is_unsafe_member(tarfile.TarInfo(name)) is unsafe


# --- listing inputs -------------------------------------------------------------------------


def test_list_input_shards(demo):
    d = str(demo["dir"])
    every = sorted(demo["good"] + [fx["path"] for fx in demo["bad"].values()])
    assert list_input_shards(d) == every
    assert list_input_shards(d + "/") == every
    assert list_input_shards(os.path.join(d, "*.tar")) == every
    assert list_input_shards(os.path.join(d, "0000[0-1].tar")) == demo["good"][:2]
    assert list_input_shards(os.path.join(d, "{00000..00002}.tar")) == demo["good"]
    assert list_input_shards(os.path.join(d, "{00001,00000}.tar")) == demo["good"][:2]  # sorted
    assert list_input_shards(demo["good"][1]) == [demo["good"][1]]
    assert list_input_shards("file://" + d) == every  # a URL of the local filesystem
    assert all(not p.endswith((".parquet", ".json")) for p in list_input_shards(d))


def test_list_input_shards_ignores_subdirectories(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"x")
    (tmp_path / "nested.tar").mkdir()
    (tmp_path / "nested.tar" / "00001.tar").write_bytes(b"x")
    assert list_input_shards(str(tmp_path)) == [str(tmp_path / "00000.tar")]


@pytest.mark.parametrize("pattern", ["*.tgz", "{90000..90003}.tar", "nothing_here", "sub/*.tar", "*.parquet"])
def test_list_input_shards_no_match(demo, pattern):
    with pytest.raises(FileNotFoundError, match="matches no .tar shard"):
        list_input_shards(os.path.join(str(demo["dir"]), pattern))


def test_empty_directory_has_no_shards(tmp_path):
    with pytest.raises(FileNotFoundError):
        list_input_shards(str(tmp_path))


# --- sidecars -------------------------------------------------------------------------------


def test_sibling_paths_and_metadata(demo, tmp_path):
    tar = demo["good"][0]
    assert sibling_path(tar, ".parquet") == tar[: -len(".tar")] + ".parquet"
    assert sibling_path(tar, schema.STATS_SUFFIX).endswith("00000_stats.json")
    assert sibling_path("s3://b/x/00001.tar", ".parquet") == "s3://b/x/00001.parquet"
    table = read_sibling_metadata(tar)
    assert table.equals(pq.read_table(sibling_path(tar, ".parquet")))
    assert read_sibling_metadata(demo["bad"]["mixed"]["path"]) is None  # no sidecar
    broken = tmp_path / "00003.tar"
    broken.write_bytes(b"")
    (tmp_path / "00003.parquet").write_bytes(np.random.default_rng(0).bytes(100))
    assert read_sibling_metadata(str(broken)) is None
