"""Reading img2dataset/WebDataset tar shards into samples, one streaming pass per tar.

Members that share a key (webdataset's rule: the base name up to its first dot) and stand
next to each other form one sample. A sample keeps every member's header and bytes so the
writer can copy it verbatim. Damage is recorded on the sample, never raised: a member name
that would escape a directory, a sample without an image, a tar cut short.
"""

from __future__ import annotations

import posixpath
import re
import tarfile
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from prune import schema
from prune.io.storage import split_url


@dataclass
class TarSample:
    key: str
    members: list[tuple[tarfile.TarInfo, bytes]] = field(default_factory=list)
    status: str = schema.STATUS_OK

    def member(self, extensions) -> Optional[tuple[str, bytes]]:
        """The first member whose extension is in `extensions`, as (extension, bytes)."""
        for info, data in self.members:
            ext = split_member_name(info.name)[1].lower()
            if ext in extensions:
                return ext, data
        return None


@dataclass
class ShardReadResult:
    """What one pass over a tar gave: its samples and, if it broke, the shard-level reason."""

    samples: list[TarSample]
    shard_error: Optional[str] = None
    detail: str = ""


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset's key/extension split: key is the path up to the first dot of the base name."""
    if "/" not in name:  # the common case, called once per member: no path to split
        stem, _, ext = name.partition(".")
        return stem, ext
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(directory, stem) if directory else stem), ext


# an unsafe name has one of these (a separator, a drive letter's colon) or is ".." itself
_MAYBE_UNSAFE = re.compile(r"[/\\:]|^\.\.$")


def is_unsafe_name(name: str) -> bool:
    """A member name that would land outside an extraction directory."""
    if not _MAYBE_UNSAFE.search(name):  # the common case, called once per member
        return False
    parts = name.replace("\\", "/").split("/")
    return name.startswith("/") or name.startswith("\\") or ".." in parts or (len(name) > 1 and name[1] == ":")


def is_unsafe_member(info: tarfile.TarInfo) -> bool:
    """An unsafe name, or a link that could point outside an extraction directory."""
    return is_unsafe_name(info.name) or info.issym() or info.islnk()


class _HeaderRecordingTarInfo(tarfile.TarInfo):
    """Remembers on the TarFile why the last header read failed.

    tarfile's iteration ends quietly, as if at the end of the archive, when the data runs out
    at or inside a header or a header is garbage; only a zero block is a real end.
    """

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as exc:
            tar.last_header_error = exc
            raise


def iter_tar_samples(fileobj) -> Iterator[TarSample]:
    """Stream samples from an open tar file object.

    Raises `tarfile.ReadError` only if not even the first header can be read (not a tar);
    a tar cut short later (in a member's data, in a header or between members, as the missing
    end-of-archive block shows) yields its last sample with status `truncated_tar`.
    """
    seen: set[str] = set()
    current: Optional[TarSample] = None
    headers = 0
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_HeaderRecordingTarInfo) as tar:
            for info in tar:
                headers += 1
                if info.isdir():
                    continue
                key, _ext = split_member_name(info.name)
                bad_name = not _is_utf8(key)
                if bad_name:  # keep a printable, stable key; the sample is not used
                    key = "non-utf8-" + key.encode("utf-8", "surrogateescape").hex()
                if current is not None and key != current.key:
                    yield current
                    current = None
                if current is None:
                    current = TarSample(key=key)
                    if key in seen:
                        current.status = schema.STATUS_DUPLICATE_KEY
                    seen.add(key)
                if bad_name:
                    current.status = schema.STATUS_BAD_NAME
                    continue
                if is_unsafe_member(info):
                    current.status = schema.STATUS_UNSAFE_NAME
                    continue
                if not info.isfile():
                    continue
                f = tar.extractfile(info)
                data = f.read() if f is not None else b""
                if len(data) != info.size:
                    raise EOFError(f"member {info.name} is cut short")
                current.members.append((info, data))
            end = getattr(tar, "last_header_error", None)
            if headers and not isinstance(end, tarfile.EOFHeaderError):
                raise EOFError(f"the archive ends without an end-of-archive block ({end})")
    except (tarfile.ReadError, tarfile.CompressionError, EOFError) as exc:
        if headers == 0:
            raise tarfile.ReadError(str(exc)) from exc
        if current is None:
            current = TarSample(key=f"<after:{headers}>")
        current.status = schema.STATUS_TRUNCATED
        yield current
        return
    if current is not None:
        yield current


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def read_shard(url: str, image_extensions, attempts: int = 3, backoff_s: float = 1.0) -> ShardReadResult:
    """Read a whole tar shard; classify each sample and the shard itself.

    An I/O error (not a damaged archive) re-reads the shard from the start, `attempts` times,
    so a passing storage fault does not turn into samples recorded as lost.
    """
    fs, path = split_url(url)
    for attempt in range(attempts):
        samples: list[TarSample] = []
        try:
            with fs.open(path, "rb") as f:
                for sample in iter_tar_samples(f):
                    if sample.status == schema.STATUS_OK and sample.member(image_extensions) is None:
                        sample.status = schema.STATUS_NO_IMAGE
                    samples.append(sample)
        except tarfile.ReadError as exc:
            return ShardReadResult(samples, schema.SHARD_NOT_A_TAR, str(exc))
        except OSError as exc:
            if attempt + 1 < attempts:
                time.sleep(backoff_s * 2**attempt)
                continue
            return ShardReadResult([], schema.SHARD_UNREADABLE, str(exc))
        if not samples:
            return ShardReadResult([], schema.SHARD_EMPTY, "the tar holds no sample")
        return ShardReadResult(samples)
    raise AssertionError("unreachable")


def sibling_path(tar_url: str, suffix: str) -> str:
    """`.../00001.tar` -> `.../00001<suffix>`, e.g. suffix `.parquet` or `_stats.json`."""
    return tar_url[: -len(".tar")] + suffix if tar_url.endswith(".tar") else tar_url + suffix


def read_sibling_metadata(tar_url: str) -> Optional[pa.Table]:
    """img2dataset's per-shard parquet beside the tar, if there is one (never required)."""
    try:
        return sibling_metadata_or_error(tar_url)[0]
    except OSError:
        return None


def sibling_metadata_or_error(tar_url: str, attempts: int = 3, backoff_s: float = 1.0) -> tuple[Optional[pa.Table], str]:
    """(the parquet beside the tar, or None; why not, "" when there is none to read). A stage that
    decides by the metadata (filter) must tell "no parquet" from "a parquet it could not read":
    an I/O error is retried `attempts` times and then raised; a damaged file is ("", the reason)."""
    fs, path = split_url(sibling_path(tar_url, ".parquet"))
    for attempt in range(attempts):
        try:
            if not fs.exists(path):
                return None, ""
            with fs.open(path, "rb") as f:
                return pq.ParquetFile(f).read(), ""
        except OSError:
            if attempt + 1 == attempts:
                raise
            time.sleep(backoff_s * 2**attempt)
        except Exception as exc:  # noqa: BLE001 - not Parquet: the caller records why
            return None, f"{path} is not a readable Parquet file: {exc}"[:300]
    raise AssertionError("unreachable")
