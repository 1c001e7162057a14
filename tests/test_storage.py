"""OutputDir: relative paths cannot leave the root; files appear whole or not at all."""

from __future__ import annotations

import errno
import os
import pickle

import fsspec
import pytest

from prune.io.storage import OutputDir, UnsafePathError, Versioned


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


def test_atomicity_is_chosen_per_filesystem(tmp_path):
    """Temp name + rename where rename is atomic; the final key directly on an object store."""
    assert OutputDir(str(tmp_path / "out")).rename_is_atomic
    assert OutputDir("memory://bucket/run").rename_is_atomic  # a rename there is a dict move
    s3 = OutputDir("s3://bucket/run", default_block_size=5 * 2**20)  # no request is made here
    assert not s3.rename_is_atomic and s3.root == "bucket/run"
    assert s3.url_of("scores", "00000.parquet") == "s3://bucket/run/scores/00000.parquet"
    clone = pickle.loads(pickle.dumps(s3))  # what a Ray worker gets: URL and options, no client
    assert clone.storage_options == s3.storage_options
    assert clone.storage_options["use_listings_cache"] is False  # see others' writes in listings
    assert not clone.rename_is_atomic


def test_find_and_arrow_filesystem(out, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    assert out.find("staged") == []
    with out.open_atomic("staged", "shard=1", "a.parquet") as f:
        pq.write_table(pa.table({"x": [1, 2]}), f)
    out.write_bytes(b"x", "staged", "b.txt")
    assert out.find("staged") == ["b.txt", "shard=1/a.parquet"]
    fs = out.arrow_filesystem()
    assert pq.read_table(out.path("staged", "shard=1"), filesystem=fs).column("x").to_pylist() == [1, 2]


def test_list_input_shards_lists_each_directory_once(tmp_path, monkeypatch):
    """A brace pattern over many names costs one listing of their directory, not a probe each."""
    from fsspec.implementations.local import LocalFileSystem

    from prune.io.storage import list_input_shards

    d = tmp_path / "in"
    d.mkdir()
    for i in (0, 1, 3):
        (d / f"{i:05d}.tar").write_bytes(b"x")
    os.symlink(d / "00000.tar", d / "00004.tar")  # a link to a tar is a shard too
    calls = []
    real_ls = LocalFileSystem.ls
    monkeypatch.setattr(LocalFileSystem, "ls", lambda self, p, *a, **k: calls.append(p) or real_ls(self, p, *a, **k))
    for name in ("exists", "isdir", "isfile"):
        monkeypatch.setattr(LocalFileSystem, name, lambda *a, **k: pytest.fail("probed a name"))
    got = list_input_shards(f"{d}/{{00000..00099}}.tar")
    assert got == [f"{d}/{i:05d}.tar" for i in (0, 1, 3, 4)]
    assert calls == [str(d)]


def test_an_output_store_without_atomic_writes_is_refused():
    from prune.io.storage import UnsupportedStorageError

    with pytest.raises(UnsupportedStorageError, match="http:// are not known to be atomic"):
        OutputDir("http://127.0.0.1:9/out")


# --- conditional writes (the output lock's primitives; S3's are tested in test_lock.py) ---------


def test_create_exclusive_creates_once_and_whole(out, tmp_path):
    assert out.conditional_writes_atomic
    assert out.create_exclusive(b"first", "d", "f")  # its directory is made
    assert not out.create_exclusive(b"second", "d", "f")
    assert (tmp_path / "out" / "d" / "f").read_bytes() == b"first"
    assert tree(tmp_path / "out") == {"d/f"}  # the temporary it was linked from is gone


def test_create_exclusive_without_hard_links_uses_o_excl(out, tmp_path, monkeypatch):
    """A filesystem without link(2) (FAT, some FUSE mounts) answers EPERM: O_EXCL creates instead."""

    def no_links(src, dst):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    assert out.create_exclusive(b"first", "f") and not out.create_exclusive(b"second", "f")
    assert (tmp_path / "out" / "f").read_bytes() == b"first" and tree(tmp_path / "out") == {"f"}


def test_replace_if_and_remove_if_act_only_on_the_version_read(out, tmp_path):
    assert out.read_versioned("f") is None
    out.write_bytes(b"one", "f")
    one = out.read_versioned("f")
    assert one == Versioned(b"one", one.version)
    assert out.replace_if(b"two", one.version, "f") and not out.replace_if(b"three", one.version, "f")
    assert not out.remove_if(one.version, "f")  # set aside, found newer, put back
    assert (tmp_path / "out" / "f").read_bytes() == b"two"
    two = out.read_versioned("f")
    assert out.remove_if(two.version, "f") and not out.remove_if(two.version, "f")  # one remover wins
    assert not out.replace_if(b"x", two.version, "f")  # gone: nothing to replace
    assert tree(tmp_path / "out") == set()  # no temporary or set-aside file is left


def test_a_store_without_conditional_writes_checks_writes_and_reads_back():
    mem = OutputDir("memory://ssl-prune-storage-test/conditional")
    assert not mem.conditional_writes_atomic
    assert mem.create_exclusive(b"one", "f") and not mem.create_exclusive(b"two", "f")
    one = mem.read_versioned("f")
    assert one.data == b"one" and mem.replace_if(b"three", one.version, "f")
    assert not mem.remove_if(one.version, "f") and mem.remove_if(mem.read_versioned("f").version, "f")
    assert not mem.exists("f")
