"""Storage through fsspec: input listing and an output directory that cannot be escaped.

Every write of the pipeline goes through `OutputDir`, which refuses a relative path that
would leave the output root and makes each file appear whole or not at all:

- on a filesystem with an atomic rename (local/POSIX) a file is written under a hidden
  temporary sibling name and renamed onto its final name only when complete;
- on an object store (S3) there is no rename (fsspec's `mv` is copy + delete), but a single
  PUT or a completed multipart upload is atomic: the object appears whole when the upload
  completes. So the file is written straight to its final key and, on any failure, the upload
  is aborted (`discard`), never completed: nothing partial appears, a previous version stays.
  A process killed mid-write never completes its upload either.

Object stores have no directories: `makedirs` is a no-op there, a "directory" exists while an
object under its prefix does, and listings are never served from fsspec's listing cache
(writes by other Ray workers would not be in it).

Conditional writes (`create_exclusive`, `replace_if`, `remove_if`, used by the output lock) are
decided by the store in one step where it can: link(2) and rename(2) locally, IfNoneMatch / IfMatch
on S3, ifGenerationMatch on GCS; elsewhere they check, write and read back
(`conditional_writes_atomic` is False). How, store by store: prune/io/conditional.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import posixpath
import uuid
from typing import Iterator

import fsspec
from braceexpand import braceexpand

from .conditional import CheckThenWrite, GCSConditional, LocalConditional, S3Conditional, Versioned


class InputError(FileNotFoundError):
    """The input names no usable shard (or two with the same name)."""


class UnsafePathError(ValueError):
    """A relative path that would escape the output directory."""


# Filesystems whose upload becomes visible only when complete and whose open-for-write file
# has a `discard()` that really aborts the upload (s3fs: AbortMultipartUpload, or no PUT at
# all for a small file). Another fsspec filesystem falls back to temporary name + rename.
_WHOLE_OBJECT_PROTOCOLS = frozenset({"s3", "s3a"})
# Where temporary name + rename is a real rename. Elsewhere (gs://, abfs://...) fsspec's `mv` is
# copy + delete, so neither way of writing is known to be atomic: such outputs are refused.
_RENAME_PROTOCOLS = frozenset({"file", "local", "memory"})


class UnsupportedStorageError(ValueError):
    """An output store on which no write of ours is known to be atomic."""


def protocols_of(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return bool({"file", "local"} & set(protocols_of(fs)))


class StoreError(InputError):
    """A URL whose storage this installation cannot reach (no fsspec driver for its protocol)."""


def split_url(url: str, **storage_options) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) of a local path or fsspec URL; a protocol without an installed driver
    is one clear error (a user's to fix: install the driver), not an ImportError deep in fsspec."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **storage_options)
    except ImportError as exc:
        raise StoreError(f"cannot open {url}: {exc} (an fsspec driver for this store is not installed)") from None
    except ValueError as exc:
        if "Protocol not known" not in str(exc):
            raise
        raise StoreError(f"cannot open {url}: {exc}") from None
    return fs, path


def _unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Turn a filesystem-local path back into a URL that any worker can open."""
    if is_local(fs):
        return path
    return fs.unstrip_protocol(path)


def _is_tar(entry: dict) -> bool:
    return entry.get("type") == "file" and entry["name"].endswith(".tar")


def list_input_shards(spec: str) -> list[str]:
    """Expand a directory, a glob or a brace pattern (local or any fsspec URL) into tar URLs.

    The result is sorted and de-duplicated; a brace-expanded name that does not exist is
    left out only if other names matched, so a typo in the pattern cannot pass silently.
    On an object store each directory is listed once (one LIST per 1000 names), not probed
    name by name: `{00000..41407}.tar` costs a few dozen requests, not 41,408.
    """
    found: list[str] = []
    listings: dict[tuple[int, str], dict[str, dict] | None] = {}

    def listing(fs, directory: str) -> dict[str, dict] | None:
        """name -> entry of a directory ({} if absent); None if it may not be listed."""
        key = (id(fs), directory)
        if key not in listings:
            fs.invalidate_cache(directory)  # shards uploaded since an earlier listing count too
            try:
                entries = fs.ls(directory, detail=True)
            except (FileNotFoundError, NotADirectoryError):
                entries = []
            except OSError:  # e.g. a bucket policy that allows GetObject but not ListBucket
                entries = None
            listings[key] = None if entries is None else {e["name"].rstrip("/"): e for e in entries}
        return listings[key]

    for pattern in braceexpand(spec):
        fs, path = split_url(pattern)
        path = path.rstrip("/") or path
        if any(ch in path for ch in "*?["):
            fs.invalidate_cache()
            found += [_unstrip(fs, p) for p in fs.glob(path) if p.endswith(".tar")]
            continue
        parent = posixpath.dirname(path)
        siblings = listing(fs, parent) if parent and parent != path else None
        entry = siblings.get(path) if siblings is not None else None
        if entry is None and siblings is not None:
            continue  # its directory was listed without it: it does not exist
        if entry is None:  # a root, or a directory that may not be listed: ask about the path
            if fs.isdir(path):
                entry = {"name": path, "type": "directory"}
            elif fs.exists(path):
                entry = {"name": path, "type": "file"}
            else:
                continue
        if entry.get("type") == "directory":
            found += [_unstrip(fs, e["name"]) for e in (listing(fs, path) or {}).values() if _is_tar(e)]
        else:
            found.append(_unstrip(fs, path))
    if not found:
        raise InputError(f"input '{spec}' matches no .tar shard")
    return sorted(set(found))


def _abort(f) -> None:
    """Throw an unfinished upload away; the file object must not commit it on close later."""
    with contextlib.suppress(Exception):
        f.discard()
    f.closed = True  # fsspec's close() (also run by __del__) would otherwise flush and commit


def _conditional_writes(fs: fsspec.AbstractFileSystem) -> CheckThenWrite:
    """The store's own conditional writes, or check-write-read-back where it has none."""
    protocols = set(protocols_of(fs))
    if is_local(fs):
        return LocalConditional(fs)
    if _WHOLE_OBJECT_PROTOCOLS & protocols:
        return S3Conditional(fs)
    if {"gs", "gcs"} & protocols:  # gs:// outputs are refused today (see _RENAME_PROTOCOLS); ready for them
        return GCSConditional(fs)
    return CheckThenWrite(fs)


class OutputDir:
    """The run's output root: joins relative paths safely and writes atomically.

    `storage_options` go to fsspec (e.g. `endpoint_url`, `default_block_size` for s3fs);
    credentials are best left to the environment (AWS_* variables), which Ray workers share.
    """

    def __init__(self, url: str, **storage_options):
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options)
        if not is_local(split_url(self.url)[0]):
            # a listing must show what other workers wrote a moment ago: no listing cache
            self.storage_options.setdefault("use_listings_cache", False)
        self.fs, root = split_url(self.url, **self.storage_options)
        self.root = root.rstrip("/")
        if not (_WHOLE_OBJECT_PROTOCOLS | _RENAME_PROTOCOLS) & set(protocols_of(self.fs)):
            raise UnsupportedStorageError(
                f"output {url!r}: writes to {protocols_of(self.fs)[0]}:// are not known to be atomic "
                "(a crash could leave half files under final names); use a local path or s3://"
            )
        self._conditional = _conditional_writes(self.fs)

    def __reduce__(self):  # ship the URL, not a live filesystem handle, to Ray workers
        return (_output_dir, (self.url, self.storage_options))

    @property
    def rename_is_atomic(self) -> bool:
        """True: temp name + rename. False: an object store where one upload is atomic instead."""
        return not bool(_WHOLE_OBJECT_PROTOCOLS & set(protocols_of(self.fs)))

    def path(self, *parts: str) -> str:
        rel = posixpath.normpath(posixpath.join(*parts)) if parts else "."
        if rel.startswith("/") or rel == ".." or rel.startswith("../"):
            raise UnsafePathError(f"path {posixpath.join(*parts)!r} escapes the output directory")
        return self.root if rel == "." else f"{self.root}/{rel}"

    def url_of(self, *parts: str) -> str:
        return _unstrip(self.fs, self.path(*parts))

    def sub(self, *parts: str) -> "OutputDir":
        """A directory inside this one, on the same storage with the same options."""
        return OutputDir(self.url_of(*parts), **self.storage_options)

    def arrow_filesystem(self):
        """This directory's filesystem for pyarrow / Ray Data (same endpoint and credentials)."""
        from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem

        return LocalFileSystem() if is_local(self.fs) else PyFileSystem(FSSpecHandler(self.fs))

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def makedirs(self, *parts: str) -> None:
        """Create a directory; on an object store (no directories) only check the bucket."""
        p = self.path(*parts)
        if self.rename_is_atomic:
            self.fs.makedirs(p, exist_ok=True)
        elif not parts:
            bucket = p.split("/", 1)[0]
            if not self.fs.exists(bucket):
                raise FileNotFoundError(f"output bucket {bucket!r} does not exist (or is not reachable)")

    def listdir(self, *parts: str) -> list[str]:
        """Base names in a directory; empty if it does not exist."""
        p = self.path(*parts)
        if not self.fs.exists(p):
            return []
        return sorted(posixpath.basename(x.rstrip("/")) for x in self.fs.ls(p, detail=False))

    def find(self, *parts: str) -> list[str]:
        """Every file under a directory, as paths relative to it (sorted); empty if absent."""
        p = self.path(*parts)
        return sorted(posixpath.relpath(x, p) for x in self.fs.find(p))

    def remove(self, *parts: str) -> None:
        p = self.path(*parts)
        if self.fs.exists(p):
            self.fs.rm(p, recursive=True)

    @contextlib.contextmanager
    def open_atomic(self, *parts: str) -> Iterator[io.IOBase]:
        """A file that appears under its final name whole, or not at all (see the module doc)."""
        final = self.path(*parts)
        if not self.rename_is_atomic:
            f = self.fs.open(final, "wb")
            try:
                yield f
            except BaseException:
                _abort(f)
                raise
            try:
                f.close()  # completes the PUT / multipart upload: the object appears whole
            except BaseException:
                _abort(f)
                raise
            return
        parent = posixpath.dirname(final)
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{posixpath.basename(final)}"
        try:
            with self.fs.open(tmp, "wb") as f:
                yield f
            self.fs.mv(tmp, final)
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.rm(tmp)
            raise

    def write_bytes(self, data: bytes, *parts: str) -> None:
        with self.open_atomic(*parts) as f:
            f.write(data)

    def write_json(self, obj, *parts: str) -> None:
        self.write_bytes(json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), *parts)

    def read_json(self, *parts: str):
        with self.fs.open(self.path(*parts), "rb") as f:
            return json.load(f)

    def open(self, *parts: str, mode: str = "rb"):
        return self.fs.open(self.path(*parts), mode)

    # conditional writes (see the module doc): what one of several racing drivers may do alone

    @property
    def conditional_writes_atomic(self) -> bool:
        """False: this store has no create-if-absent; `create_exclusive` checks, writes, reads back."""
        return self._conditional.atomic

    def create_exclusive(self, data: bytes, *parts: str) -> bool:
        """Write a file that does not exist yet: True if created, False if it already existed."""
        return self._conditional.create(self.path(*parts), data)

    def read_versioned(self, *parts: str) -> Versioned | None:
        """A file's bytes and version, for `replace_if` / `remove_if`; None if it does not exist."""
        return self._conditional.read(self.path(*parts))

    def replace_if(self, data: bytes, version: str, *parts: str) -> bool:
        """Overwrite a file only if it is still `version` (False: changed or gone)."""
        return self._conditional.replace(self.path(*parts), data, version)

    def remove_if(self, version: str, *parts: str) -> bool:
        """Delete a file only if it is still `version`; of racing removers one succeeds."""
        return self._conditional.remove(self.path(*parts), version)


def _output_dir(url: str, storage_options: dict) -> OutputDir:
    return OutputDir(url, **storage_options)
