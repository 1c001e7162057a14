"""Where each sample's members lie in a tar, so the writer copies kept samples as raw byte ranges
(headers included) instead of parsing and re-packing every member in Python.

img2dataset writes plain ustar tars: one 512-byte header per member, then its data. Such a tar is
walked here header by header (checksum, octal size, name), seeking over the data. Anything else
(PAX or GNU long-name headers, links, devices, unsafe or non-UTF-8 names, a damaged or cut tar)
is read by `prune.io.shards.iter_tar_samples` itself, whose TarInfo offsets give the spans, so
the samples and their statuses are always the reader's own.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from prune import schema
from prune.io.shards import is_unsafe_name, iter_tar_samples, split_member_name

BLOCK = 512
ZERO_BLOCK = b"\0" * BLOCK
END_OF_ARCHIVE = ZERO_BLOCK * 2
RECORD = 20 * BLOCK  # tar and GNU tar pad an archive to a whole record
_FILE_TYPES, _DIR_TYPE = (b"0", b"\0"), b"5"
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\0", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd


def padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


class MemberSpan(NamedTuple):  # a tuple, not a frozen dataclass: one is made per member walked
    name: str
    header_at: int  # the member's first header block (PAX or GNU long-name headers included)
    data_at: int
    size: int

    @property
    def span(self) -> tuple[int, int]:
        """(offset, length) of the member as stored: headers, data, padding."""
        return self.header_at, self.data_at - self.header_at + padded(self.size)


@dataclass
class SampleSpans:
    key: str
    members: list[MemberSpan] = field(default_factory=list)  # its regular files, in tar order
    ok: bool = True  # the reader's status is ok (a duplicate key, unsafe name or cut tar is not)

    @property
    def spans(self) -> list[tuple[int, int]]:
        return [m.span for m in self.members]

    def member(self, extensions) -> MemberSpan | None:
        """The first member whose extension is in `extensions` (as `TarSample.member`)."""
        return next((m for m in self.members if split_member_name(m.name)[1].lower() in extensions), None)


class CompressedTar(ValueError):
    """Raw spans of a compressed tar mean nothing: the writer copies uncompressed members."""


class _NotPlain(Exception):
    """Something the header walk leaves to the reader."""


def _octal(raw: bytes) -> int:
    if raw[:1] and raw[0] & 0x80:
        raise _NotPlain("base-256 number")
    text = raw.replace(b"\0", b" ").strip()
    if text[:1] in (b"-", b"+"):  # int() takes a sign; a negative size would walk backwards forever
        raise _NotPlain("a signed number")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise _NotPlain("not an octal number") from None


def _positional_reader(f):
    """(offset, length) -> the bytes there (short at the end of the file): `os.pread` on a local
    file's descriptor (no seek, no Python file layers: one call per read), else seek and read."""
    fd = _fileno(f)
    if fd is not None and hasattr(os, "pread"):
        return lambda offset, length: os.pread(fd, length, offset)

    def read(offset: int, length: int) -> bytes:
        f.seek(offset)
        return f.read(length)
    return read


_CHECKSUM_FIELD_AS_SPACES = 8 * 32  # the checksum is computed with its own field read as spaces


def _plain_samples(f, file_size: int) -> list[SampleSpans]:
    samples: list[SampleSpans] = []
    seen: set[str] = set()
    headers: list[bytes] = []  # checksums are verified for all headers at once, at the end
    stored: list[int] = []
    offset = 0
    read = _positional_reader(f)
    while True:
        header = read(offset, BLOCK)
        if header == ZERO_BLOCK:
            _verify_checksums(headers, stored)
            return samples
        if len(header) < BLOCK:
            raise _NotPlain("no end-of-archive block")
        headers.append(header)
        stored.append(_octal(header[148:156]))
        kind = header[156:157]
        if kind not in _FILE_TYPES and kind != _DIR_TYPE:
            raise _NotPlain(f"member type {kind!r}")
        raw = header[:100].split(b"\0", 1)[0]
        if header[257:265] == b"ustar\x0000" and header[345] != 0:  # POSIX ustar's name prefix
            raw = header[345:500].split(b"\0", 1)[0] + b"/" + raw
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _NotPlain("a name that is not UTF-8") from None
        if kind == b"\0" and name.endswith("/"):  # an old-style directory, as tarfile reads it
            kind = _DIR_TYPE
        size = _octal(header[124:136])
        if offset + BLOCK + size > file_size or is_unsafe_name(name):
            raise _NotPlain("an unsafe name or a member cut short")
        if kind in _FILE_TYPES:
            key = split_member_name(name)[0]
            if not samples or samples[-1].key != key:
                samples.append(SampleSpans(key, ok=key not in seen))
                seen.add(key)
            samples[-1].members.append(MemberSpan(name, offset, offset + BLOCK, size))
        offset += BLOCK + padded(size)


def _verify_checksums(headers: list[bytes], stored: list[int]) -> None:
    """Every header's unsigned checksum (its bytes summed, the checksum field read as spaces) is
    the one it stores; a damaged header anywhere sends the whole tar to the reader."""
    if not headers:
        return
    blocks = np.frombuffer(b"".join(headers), np.uint8).reshape(len(headers), BLOCK)
    sums = blocks.sum(axis=1, dtype=np.int64) - blocks[:, 148:156].sum(axis=1, dtype=np.int64) + _CHECKSUM_FIELD_AS_SPACES
    if not np.array_equal(sums, np.asarray(stored, np.int64)):
        raise _NotPlain("bad checksum")


def _reader_samples(f) -> list[SampleSpans]:
    f.seek(0)
    return [
        SampleSpans(s.key, [MemberSpan(i.name, i.offset, i.offset_data, i.size) for i, _ in s.members],
                    s.status == schema.STATUS_OK)
        for s in iter_tar_samples(f)
    ]


def sample_spans(f) -> list[SampleSpans]:
    """Every sample of a seekable tar, in order, with its members' byte spans and whether it is ok.
    Raises CompressedTar for a compressed one, tarfile.ReadError for one that is no tar."""
    f.seek(0)
    if f.read(6).startswith(_COMPRESSED):
        raise CompressedTar("a compressed tar: pruned shards copy the members of uncompressed tars only")
    file_size = f.seek(0, 2)
    try:
        return _plain_samples(f, file_size)
    except _NotPlain:
        return _reader_samples(f)


def read_member(f, member: MemberSpan) -> bytes:
    """One member's data, read from the open tar without touching the rest."""
    f.seek(member.data_at)
    return f.read(member.size)


def coalesce(spans) -> list[tuple[int, int]]:
    """Adjacent (offset, length) spans merged: one read per run of neighbouring members."""
    merged: list[list[int]] = []
    for offset, length in spans:
        if merged and merged[-1][0] + merged[-1][1] == offset:
            merged[-1][1] += length
        else:
            merged.append([offset, length])
    return [(o, n) for o, n in merged]


def _fileno(f) -> int | None:
    try:
        return f.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None


def _copy_in_kernel(src_fd: int, dst, offset: int, length: int) -> int:
    """`os.copy_file_range` from `src_fd` at `offset` to `dst`'s position (as `cp` does: the bytes
    never pass through Python); -> bytes copied, short only where the kernel declined the rest."""
    dst.flush()  # what `dst` buffered goes first; the kernel then writes at the descriptor's position
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(src_fd, dst.fileno(), length - done, offset + done)
        except OSError:  # another file system, or a kernel without it: the caller reads and writes
            return done
        if n == 0:
            raise EOFError(f"the file ends inside the span {offset}+{length}")
        done += n
    return done


def copy_spans(src, dst, spans, chunk: int = 8 << 20) -> int:
    """Copy byte spans of `src` to `dst` (both open files); -> bytes copied. Local files are
    copied by the kernel (`copy_file_range`); others through a buffer of `chunk` bytes."""
    total = 0
    src_fd = _fileno(src) if hasattr(os, "copy_file_range") and _fileno(dst) is not None else None
    for offset, length in coalesce(spans):
        done = _copy_in_kernel(src_fd, dst, offset, length) if src_fd is not None else 0
        if done < length:
            src.seek(offset + done)
            left = length - done
            while left:
                data = src.read(min(chunk, left))
                if not data:
                    raise EOFError(f"the file ends inside the span {offset}+{length}")
                dst.write(data)
                left -= len(data)
        total += length
    return total


def scatter_spans(src, routes, dsts: dict, window: int = 8 << 20, max_gap: int = 1 << 20) -> dict:
    """Copy spans of `src` to several files in one sequential pass: `routes` is (offset, length,
    dst key) in any order; each `dsts[key]` receives its spans in offset order. Neighbouring spans
    are read together in windows of up to `window` bytes (a gap over `max_gap` starts a new one),
    and each window's pieces for one file go out in one write: a few calls per window, not two per
    member, which is what makes copying many small members cheap (object storage). Between local
    files the kernel copies each file's spans instead (`copy_spans`). -> bytes written per key."""
    written = dict.fromkeys(dsts, 0)
    routes = sorted(routes, key=lambda r: r[0])
    if hasattr(os, "copy_file_range") and _fileno(src) is not None and all(_fileno(d) is not None for d in dsts.values()):
        for key, dst in dsts.items():
            written[key] += copy_spans(src, dst, [(o, n) for o, n, k in routes if k == key])
        return written
    read, i = _positional_reader(src), 0
    while i < len(routes):
        start = routes[i][0]
        j, end = i, start
        while j < len(routes) and routes[j][0] + routes[j][1] - start <= window and routes[j][0] - end <= max_gap:
            end = routes[j][0] + routes[j][1]
            j += 1
        if j == i:  # one span larger than a window: copied on its own
            offset, length, key = routes[i]
            written[key] += copy_spans(src, dsts[key], [(offset, length)])
            i += 1
            continue
        data = memoryview(read(start, end - start))
        if len(data) < end - start:
            raise EOFError(f"the file ends inside the spans {start}..{end}")
        pieces: dict = {}
        for offset, length, key in routes[i:j]:
            pieces.setdefault(key, []).append(data[offset - start : offset - start + length])
            written[key] += length
        for key, views in pieces.items():
            dsts[key].write(b"".join(views))
        i = j
    return written


def finish_archive(dst, written: int) -> None:
    """The end-of-archive blocks, padded to a whole record as tar writes it."""
    end = written + len(END_OF_ARCHIVE)
    dst.write(END_OF_ARCHIVE + b"\0" * (-end % RECORD))
