"""OutputDir: relative paths cannot leave the root; files appear whole or not at all."""

from __future__ import annotations

import os
import pickle

import fsspec
import pytest

from prune.storage import OutputDir, UnsafePathError


def tree(root) -> set[str]:
    """Every file under root, relative, including hidden temporaries."""
    return {
        os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files
    }


@pytest.fixture
def out(tmp_path):
    return OutputDir(str(tmp_path / "out"))


@pytest.mark.parametrize(
    "parts",
    [
        ("../x",),
        ("..",),
        ("/abs",),
        ("/abs/x.json",),
        ("a/../../x",),
        ("a", "..", "..", "x"),
        ("scores", "../../x.parquet"),
        ("a/b/../../../x",),
        ("ok", "/etc/passwd"),  # an absolute later part replaces the join
    ],
)
def test_path_refuses_escapes(out, parts):
    with pytest.raises(UnsafePathError):
        out.path(*parts)
    with pytest.raises(UnsafePathError):
        out.write_bytes(b"x", *parts)
    with pytest.raises(UnsafePathError):
        with out.open_atomic(*parts):
            pass


@pytest.mark.parametrize(
    "parts, rel",
    [
        ((), "."),
        (("scores", "00000.parquet"), "scores/00000.parquet"),
        (("a/./b", "c"), "a/b/c"),
        (("a/../b",), "b"),  # stays inside: fine
        (("..x",), "..x"),  # a name that starts with dots is not a parent reference
        (("a..", "b"),  "a../b"),
    ],
)
def test_path_inside(out, tmp_path, parts, rel):
    root = str(tmp_path / "out")
    expected = root if rel == "." else f"{root}/{rel}"
    assert out.path(*parts) == expected


def test_writes_land_under_the_root_only(tmp_path):
    out = OutputDir(str(tmp_path / "out") + "/")  # a trailing slash changes nothing
    out.write_bytes(b"abc", "scores", "00000.parquet")
    out.write_json({"b": 1, "a": [1, 2]}, "manifest.json")
    with out.open_atomic("pruned/00000.tar") as f:
        f.write(b"tar")
    for bad in ("../escaped.json", "/tmp/escaped.json", "a/../../escaped.json"):
        with pytest.raises(UnsafePathError):
            out.write_json({}, bad)
    assert tree(tmp_path) == {"out/scores/00000.parquet", "out/manifest.json", "out/pruned/00000.tar"}
    assert (tmp_path / "out/scores/00000.parquet").read_bytes() == b"abc"
    assert out.read_json("manifest.json") == {"a": [1, 2], "b": 1}
    assert out.exists("pruned", "00000.tar") and not out.exists("pruned", "00001.tar")
    assert out.listdir() == ["manifest.json", "pruned", "scores"]
    assert out.listdir("nothing") == []
    with out.open("scores", "00000.parquet") as f:
        assert f.read() == b"abc"


def test_open_atomic_failure_leaves_neither_temp_nor_final(out, tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with out.open_atomic("scores", "00000.parquet") as f:
            f.write(b"half a file")
            raise RuntimeError("boom")
    assert tree(tmp_path) == set()  # the parent directory may exist; no file does
    assert not out.exists("scores", "00000.parquet")


def test_open_atomic_failure_keeps_the_previous_version(out, tmp_path):
    out.write_bytes(b"version 1", "manifest.json")
    with pytest.raises(KeyboardInterrupt):  # BaseException too: a worker killed mid-write
        with out.open_atomic("manifest.json") as f:
            f.write(b"version 2, cut")
            raise KeyboardInterrupt
    assert tree(tmp_path) == {"out/manifest.json"}
    assert (tmp_path / "out/manifest.json").read_bytes() == b"version 1"


def test_final_name_absent_until_complete(out, tmp_path):
    with out.open_atomic("embeddings", "00000.parquet") as f:
        f.write(b"partial")
        assert not out.exists("embeddings", "00000.parquet")
        (temp,) = tree(tmp_path)
        assert os.path.dirname(temp) == "out/embeddings"  # a sibling: the rename stays on one fs
        assert os.path.basename(temp).startswith(".tmp-")  # hidden from listings of *.parquet
    assert tree(tmp_path) == {"out/embeddings/00000.parquet"}
    assert out.listdir("embeddings") == ["00000.parquet"]


def test_overwrite_replaces_whole_file(out):
    out.write_bytes(b"a long first version", "x.json")
    out.write_bytes(b"short", "x.json")
    with out.open("x.json") as f:
        assert f.read() == b"short"


def test_remove_and_makedirs(out, tmp_path):
    out.makedirs("_staging", "band000")
    out.write_bytes(b"x", "_staging", "band000", "00000.tar")
    out.remove("_staging")
    out.remove("_staging")  # absent: no error
    assert not (tmp_path / "out" / "_staging").exists()
    with pytest.raises(UnsafePathError):
        out.remove("..")


def test_url_of_and_pickling(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    assert out.url_of("a", "b.json") == str(tmp_path / "out" / "a" / "b.json")
    clone = pickle.loads(pickle.dumps(out))
    assert clone.url == out.url and clone.root == out.root
    clone.write_bytes(b"1", "f")
    assert out.exists("f")
    mem = OutputDir("memory://bucket/run")
    mem.write_bytes(b"remote", "scores", "00000.parquet")
    url = mem.url_of("scores", "00000.parquet")
    assert url.startswith("memory://") and url.endswith("bucket/run/scores/00000.parquet")
    with fsspec.open(url, "rb") as f:  # the URL alone reaches the file, as on another worker
        assert f.read() == b"remote"
    with pytest.raises(UnsafePathError):
        mem.url_of("../other")
