"""Storage through fsspec: input listing and an output directory that cannot be escaped.

Every write of the pipeline goes through `OutputDir`, which refuses a relative path that
would leave the output root and writes each file under a temporary name first, renaming it
only when complete, so a crash never leaves a half file under a final name.
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


class InputError(FileNotFoundError):
    """The input names no usable shard (or two with the same name)."""


class UnsafePathError(ValueError):
    """A relative path that would escape the output directory."""


def split_url(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def _unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Turn a filesystem-local path back into a URL that any worker can open."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return path
    return fs.unstrip_protocol(path)


def list_input_shards(spec: str) -> list[str]:
    """Expand a directory, a glob or a brace pattern (local or any fsspec URL) into tar URLs.

    The result is sorted and de-duplicated; a brace-expanded name that does not exist is
    left out only if other names matched, so a typo in the pattern cannot pass silently.
    """
    found: list[str] = []
    for pattern in braceexpand(spec):
        fs, path = split_url(pattern)
        if any(ch in path for ch in "*?["):
            found += [_unstrip(fs, p) for p in fs.glob(path) if p.endswith(".tar")]
        elif fs.isdir(path):
            found += [
                _unstrip(fs, p)
                for p in fs.ls(path, detail=False)
                if p.endswith(".tar") and fs.isfile(p)
            ]
        elif fs.exists(path):
            found.append(_unstrip(fs, path))
    if not found:
        raise InputError(f"input '{spec}' matches no .tar shard")
    return sorted(set(found))


class OutputDir:
    """The run's output root: joins relative paths safely and writes atomically."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = split_url(self.url)
        self.root = self.root.rstrip("/")

    def __reduce__(self):  # ship the URL, not a live filesystem handle, to Ray workers
        return (OutputDir, (self.url,))

    def path(self, *parts: str) -> str:
        rel = posixpath.normpath(posixpath.join(*parts)) if parts else "."
        if rel.startswith("/") or rel == ".." or rel.startswith("../"):
            raise UnsafePathError(f"path {posixpath.join(*parts)!r} escapes the output directory")
        return self.root if rel == "." else f"{self.root}/{rel}"

    def url_of(self, *parts: str) -> str:
        return _unstrip(self.fs, self.path(*parts))

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def makedirs(self, *parts: str) -> None:
        self.fs.makedirs(self.path(*parts), exist_ok=True)

    def listdir(self, *parts: str) -> list[str]:
        """Base names in a directory; empty if it does not exist."""
        p = self.path(*parts)
        if not self.fs.exists(p):
            return []
        return sorted(posixpath.basename(x.rstrip("/")) for x in self.fs.ls(p, detail=False))

    def remove(self, *parts: str) -> None:
        p = self.path(*parts)
        if self.fs.exists(p):
            self.fs.rm(p, recursive=True)

    @contextlib.contextmanager
    def open_atomic(self, *parts: str) -> Iterator[io.IOBase]:
        """Write to a temporary sibling, rename onto the final name only on success."""
        final = self.path(*parts)
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
