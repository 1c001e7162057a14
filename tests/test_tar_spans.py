"""Raw member spans: the header walk agrees with the reader, and copied spans are the members as stored."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from prune import schema
from prune.demo.shards import write_bad_shards, write_demo_shards
from prune.io.shards import iter_tar_samples
from prune.io.span_copy import copy_spans
from prune.io.tar_spans import (
    RECORD,
    CompressedTar,
    _NotPlain,
    _plain_index,
    finish_archive,
    index_of_reader,
    tar_index,
)


def _plain_samples(f, size):
    """The header walk's samples (no fallback to the reader)."""
    return _plain_index(f, size).samples()


def _reader_samples(f):
    """The reader's samples, as the walk falls back to them."""
    f.seek(0)
    return index_of_reader(iter_tar_samples(f)).samples()


def sample_spans(f):
    """Every sample of the tar with its spans, as the writer finds them."""
    return tar_index(f).samples()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("spans")
    good = write_demo_shards(str(root), split="test", count=30, shard_size=15, seed=2)
    bad = write_bad_shards(str(root), good[0])
    return {"good": good, "bad": bad, "root": root}


def _tar(path, members, fmt=tarfile.GNU_FORMAT) -> str:
    """A tar of (name, bytes) members in `fmt` (a name ending in "/" is a directory)."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.uname = len(data), 1_700_000_000, "someone"
            info.type = tarfile.DIRTYPE if name.endswith("/") else tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _fix_checksum(raw: bytearray, at: int, form: bytes = b"%06o\0 ") -> None:
    """The header at `at` gets its right checksum again, written in `form`."""
    block = raw[at : at + 512]
    block[148:156] = b" " * 8
    raw[at + 148 : at + 156] = form % sum(block)


def _as_reader_sees(path):
    with open(path, "rb") as f:
        return [(s.key, s.status == schema.STATUS_OK, [(i.name, d) for i, d in s.members]) for s in iter_tar_samples(f)]


def _as_spans_copy(path):
    """Each sample's members, read back from a tar made of its copied spans alone."""
    out = []
    with open(path, "rb") as f:
        for s in sample_spans(f):
            buf = io.BytesIO()
            finish_archive(buf, copy_spans(f, buf, s.spans))
            buf.seek(0)
            with tarfile.open(fileobj=buf) as tar:
                members = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
            out.append((s.key, s.ok, members))
    return out


def test_header_walk_matches_the_reader_on_img2dataset_shards(shards):
    for path in shards["good"]:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            fast, reader = _plain_samples(f, size), _reader_samples(f)
        assert fast == reader and len(fast) == 15
        assert all(s.ok and len(s.members) == 3 for s in fast)
        assert _as_spans_copy(path) == _as_reader_sees(path)


def test_the_index_gives_any_samples_spans_as_columns(shards):
    """The writer's columnar spans of any rows equal those samples' own spans, on the header walk
    and on the reader's path (a damaged shard)."""
    for path in shards["good"] + [shards["bad"][case]["path"] for case in ("mixed", "truncated")]:
        with open(path, "rb") as f:
            index = tar_index(f)
        samples = index.samples()
        assert [(s.key, s.ok) for s in samples] == list(zip(index.keys, index.ok))
        for rows in ([0], list(range(len(samples)))[::-2], [len(samples) - 1, 0]):
            list_offsets, offsets, lengths = index.spans(rows)
            got = [list(zip(offsets[a:b].tolist(), lengths[a:b].tolist())) for a, b in zip(list_offsets, list_offsets[1:])]
            assert got == [samples[r].spans for r in rows]
        assert index.member(0, ("txt",)) == samples[0].member(("txt",))


@pytest.mark.parametrize("case", ["mixed", "truncated"])
def test_damaged_shards_keep_the_readers_samples_and_statuses(shards, case):
    path = shards["bad"][case]["path"]
    with open(path, "rb") as f:
        got = [(s.key, s.ok) for s in sample_spans(f)]
    assert got == [(key, ok) for key, ok, _ in _as_reader_sees(path)]
    assert any(not ok for _, ok in got)  # the unsafe names / the sample cut short


def test_long_names_pax_headers_and_duplicate_keys(tmp_path):
    long_dir = "d" * 120
    members = [(f"{long_dir}/a.jpg", b"A" * 700), (f"{long_dir}/a.txt", "é".encode()),
               ("b.jpg", b"B" * 512), ("b.txt", b"b"), ("b.jpg", b"again"), ("c.jpg", b"")]
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        path = _tar(tmp_path / f"fmt{fmt}.tar", members, fmt)
        assert _as_spans_copy(path) == _as_reader_sees(path)
        with open(path, "rb") as f:
            samples = sample_spans(f)
        assert [(s.key, s.ok) for s in samples] == [(f"{long_dir}/a", True), ("b", True), ("c", True)]
    # the second "b.jpg" run is the same key again: the reader's duplicate, not ok
    path = _tar(tmp_path / "dup.tar", [("b.jpg", b"1"), ("c.jpg", b"2"), ("b.jpg", b"3")])
    with open(path, "rb") as f:
        assert [(s.key, s.ok) for s in sample_spans(f)] == [("b", True), ("c", True), ("b", False)]


def test_spans_include_the_stored_headers(tmp_path):
    path = _tar(tmp_path / "one.tar", [("k.jpg", b"x" * 1000), ("k.json", b"{}")])
    raw = open(path, "rb").read()
    with open(path, "rb") as f:
        (sample,) = sample_spans(f)
    offset, length = sample.spans[0][0], sum(n for _, n in sample.spans)
    assert offset == 0 and length == 512 + 1024 + 512 + 512  # both headers, data, padding
    buf = io.BytesIO()
    finish_archive(buf, copy_spans(open(path, "rb"), buf, sample.spans))
    assert buf.getvalue()[:length] == raw[:length] and len(buf.getvalue()) % RECORD == 0


def test_a_compressed_tar_is_refused_by_name(tmp_path):
    path = _tar(tmp_path / "plain.tar", [("k.jpg", b"x")])
    gz = tmp_path / "k.tar"
    gz.write_bytes(gzip.compress(open(path, "rb").read()))
    with open(gz, "rb") as f, pytest.raises(CompressedTar, match="compressed"):
        sample_spans(f)


def test_a_file_without_a_descriptor_and_odd_names_walk_as_the_reader_reads(tmp_path):
    """Local files are walked with pread, other files by seek and read: the same spans; names that
    may be unsafe ("..", a drive letter, backslashes) or sit in directories still match the reader."""
    names = ["a.jpg", "..", "c:x.jpg", "x\\..\\y.jpg", "d/e.jpg", "d/e.txt", "f.tar.jpg", "..g.jpg"]
    path = _tar(tmp_path / "odd.tar", [(name, name.encode()) for name in names])
    with open(path, "rb") as f:
        local = sample_spans(f)
    in_memory = sample_spans(io.BytesIO(open(path, "rb").read()))  # no fileno: seek and read
    assert local == in_memory
    assert [(s.key, s.ok) for s in local] == [(key, ok) for key, ok, _ in _as_reader_sees(path)]
    assert any(not s.ok for s in local)  # the unsafe ones
    plain = _tar(tmp_path / "plain.tar", [(name, b"x") for name in ("a.jpg", "d/e.jpg", "f.tar.jpg")])
    with open(plain, "rb") as f:
        size = f.seek(0, 2)
        assert _plain_samples(f, size) == _reader_samples(f)  # safe names stay on the header walk
    assert sample_spans(io.BytesIO(open(plain, "rb").read())) == _plain_samples(open(plain, "rb"), size)


def test_directories_are_no_samples_and_do_not_split_one(tmp_path):
    only_dirs = _tar(tmp_path / "dirs.tar", [("d/", b""), ("e/", b"")])
    split = _tar(tmp_path / "split.tar", [("a.jpg", b"1"), ("d/", b""), ("a.txt", b"2"), ("b.jpg", b"3")])
    for path, want in ((only_dirs, []), (split, [("a", 2), ("b", 1)])):
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            fast = _plain_samples(f, size)
            assert fast == _reader_samples(f)
        assert [(s.key, len(s.members)) for s in fast] == want


@pytest.mark.parametrize("size_field", [b"-0001000\0\0\0\0", b"-0010000\0\0\0\0"])
def test_a_negative_size_goes_to_the_reader_and_ends(tmp_path, size_field):
    """A damaged size field with a sign (int() would take it) must not make the walk go backwards or
    stand still: the tar goes to the reader, whatever its checksum says."""
    path = _tar(tmp_path / "neg.tar", [("a.jpg", b"A" * 700), ("a.txt", b"t"), ("b.jpg", b"B" * 10)])
    raw = bytearray(open(path, "rb").read())
    second = 512 + 1024  # the header after a.jpg's 700 bytes of data
    raw[second + 124 : second + 136] = size_field
    for fix_checksum in (False, True):
        if fix_checksum:
            _fix_checksum(raw, second)
        (tmp_path / "bad.tar").write_bytes(bytes(raw))
        with open(tmp_path / "bad.tar", "rb") as f:
            with pytest.raises(_NotPlain):
                _plain_samples(f, len(raw))
            got = sample_spans(f)
            assert got == _reader_samples(f)


def test_ustar_prefixes_old_style_directories_and_other_checksum_forms_stay_on_the_walk(tmp_path):
    """Headers the walk reads for all members at once, in their less usual forms: a POSIX ustar
    name split into prefix and name, a directory of type NUL whose name ends in "/", a checksum
    stored as seven digits and a NUL (not six, NUL, space). Walked, not sent to the reader, and
    read as the reader reads them; one wrong checksum among them still sends the tar to the reader."""
    long_dir = "d" * 120
    path = _tar(tmp_path / "ustar.tar", [("a.jpg", b"A" * 600), (f"{long_dir}/b.jpg", b"B"), (f"{long_dir}/b.txt", b"t")],
                fmt=tarfile.USTAR_FORMAT)
    raw = bytearray(open(path, "rb").read())
    assert raw[512 + 1024 + 345] != 0  # the long name went into the ustar prefix
    old_dir = tarfile.TarInfo("olddir/")
    old_dir.type = tarfile.DIRTYPE
    header = bytearray(old_dir.tobuf(tarfile.USTAR_FORMAT))
    header[156] = 0  # type NUL: a directory only by its trailing "/"
    with tarfile.open(path) as tar:  # where the end-of-archive blocks start
        end = max(m.offset_data + -(-m.size // 512) * 512 for m in tar.getmembers())
    raw[end:end] = header
    for at in (0, end):  # a checksum as seven digits and a NUL
        _fix_checksum(raw, at, b"%07o\0")
    (tmp_path / "odd.tar").write_bytes(bytes(raw))
    with open(tmp_path / "odd.tar", "rb") as f:
        walked = _plain_samples(f, len(raw))
        assert walked == _reader_samples(f)
        assert len(tarfile.open(tmp_path / "odd.tar").getmembers()) == 4  # the old-style directory too
    assert [s.key for s in walked] == ["a", f"{long_dir}/b"] and [len(s.members) for s in walked] == [1, 2]
    raw[end + 148 : end + 156] = b"%07o\0" % 1  # a wrong one
    (tmp_path / "bad.tar").write_bytes(bytes(raw))
    with open(tmp_path / "bad.tar", "rb") as f, pytest.raises(_NotPlain):
        _plain_samples(f, len(raw))


def _dir_with_data(raw: bytearray) -> None:  # tarfile does not skip a directory's data; the walk must not either
    raw[124:136] = b"%011o\0" % 1024  # a walk skipping it would land on a.txt's header, past a.jpg
    _fix_checksum(raw, 0)


def _gnu_prefix_area(raw: bytearray) -> None:  # tarfile reads a prefix here whatever the magic says
    raw[345:349] = b"pfx\0"
    _fix_checksum(raw, 0)


@pytest.mark.parametrize("members, fmt, patch, walked", [
    ([("n" * 96 + ".jpg", b"A"), ("n" * 96 + ".txt", b"t")], tarfile.USTAR_FORMAT, None, True),  # 100 bytes, no NUL
    ([("../" + "d" * 101 + "/x.jpg", b"A"), ("b.jpg", b"B")], tarfile.USTAR_FORMAT, None, False),  # ".." in the prefix
    ([("a.jpg", b"A"), ("b.jpg", b"B")], tarfile.GNU_FORMAT, _gnu_prefix_area, False),
    ([("d/", b""), ("a.jpg", b"A"), ("a.txt", b"t")], tarfile.GNU_FORMAT, _dir_with_data, False),
])
def test_headers_read_as_tarfile_reads_them_or_left_to_the_reader(tmp_path, members, fmt, patch, walked):
    path = tmp_path / "t.tar"
    _tar(path, members, fmt)
    raw = bytearray(path.read_bytes())
    if patch:
        patch(raw)
        path.write_bytes(bytes(raw))
    with open(path, "rb") as f:
        got = sample_spans(f)
        assert got == _reader_samples(f)
        if walked:
            assert _plain_samples(f, len(raw)) == got
        else:
            with pytest.raises(_NotPlain):
                _plain_samples(f, len(raw))
