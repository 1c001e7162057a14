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
_PLAIN_KINDS = frozenset(b"0\x005")  # a regular file (b"0", or NUL in old tars) or a directory
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
_USTAR = np.frombuffer(b"ustar\x0000", np.uint8)
_SLASH, _BACKSLASH, _COLON, _DOT = (ord(c) for c in "/\\:.")


def _headers(f, file_size: int) -> tuple[list[bytes], list[int], list[int]]:
    """(header, offset, size) of every member up to the end-of-archive block: the only part of the
    walk that must go header by header (each size says where the next header is), kept to one read,
    one size field and an append per member; everything else is checked for all headers at once."""
    headers: list[bytes] = []
    offsets: list[int] = []
    sizes: list[int] = []
    read = _positional_reader(f)
    offset = 0
    while True:
        header = read(offset, BLOCK)
        if header == ZERO_BLOCK:
            return headers, offsets, sizes
        if len(header) < BLOCK:
            raise _NotPlain("no end-of-archive block")
        if header[156] not in _PLAIN_KINDS:  # PAX or GNU long-name headers, links...: at the first one
            raise _NotPlain(f"member type {header[156:157]!r}")
        size = _octal(header[124:136])
        if offset + BLOCK + size > file_size:
            raise _NotPlain("a member cut short")
        headers.append(header)
        offsets.append(offset)
        sizes.append(size)
        offset += BLOCK + padded(size)


def _plain_samples(f, file_size: int) -> list[SampleSpans]:
    headers, offsets, sizes = _headers(f, file_size)
    if not headers:
        return []
    blocks = np.frombuffer(b"".join(headers), np.uint8).reshape(len(headers), BLOCK)
    _verify_checksums(blocks, headers)
    kinds = blocks[:, 156]  # each one of _PLAIN_KINDS (checked by _headers)
    is_file = kinds != ord("5")
    # names end at their first NUL; a POSIX ustar header may put a directory prefix before them
    lengths = np.where((blocks[:, :100] == 0).any(axis=1), np.argmax(blocks[:, :100] == 0, axis=1), 100)
    prefixed = np.all(blocks[:, 257:265] == _USTAR, axis=1) & (blocks[:, 345] != 0)
    # where tarfile reads these otherwise, the reader decides: a prefix area it would read without the
    # ustar magic, an empty name (with a prefix and type NUL, "dir/" is a file to it)
    if np.any((blocks[:, 345] != 0) & ~prefixed) or np.any(lengths == 0):
        raise _NotPlain("a header tarfile reads another way")
    raw = [h[:n] for h, n in zip(headers, lengths.tolist())]
    for i in np.flatnonzero(prefixed).tolist():
        raw[i] = headers[i][345:500].split(b"\0", 1)[0] + b"/" + raw[i]
    try:  # names hold no NUL: one decode for all of them
        names = b"\0".join(raw).decode("utf-8").split("\0")
    except UnicodeDecodeError:
        raise _NotPlain("a name that is not UTF-8") from None
    # only names with a separator or a colon, or ".." itself, can be unsafe; the rest skip the check
    cols = np.arange(100)
    odd = ((blocks[:, :100] == _SLASH) | (blocks[:, :100] == _BACKSLASH) | (blocks[:, :100] == _COLON)) & (cols < lengths[:, None])
    maybe_unsafe = odd.any(axis=1) | prefixed | ((lengths == 2) & (blocks[:, 0] == _DOT) & (blocks[:, 1] == _DOT))
    if any(is_unsafe_name(names[i]) for i in np.flatnonzero(maybe_unsafe).tolist()):
        raise _NotPlain("an unsafe name")
    # an old-style directory (type NUL, name ending in "/") is a directory, as tarfile reads it
    is_file[[i for i in np.flatnonzero(kinds == 0).tolist() if names[i].endswith("/")]] = False
    if np.any(~is_file & (np.asarray(sizes) != 0)):  # tarfile does not skip a directory's data
        raise _NotPlain("a directory with data")
    samples: list[SampleSpans] = []
    seen: set[str] = set()
    current = None
    for i in np.flatnonzero(is_file).tolist():
        name = names[i]
        key = split_member_name(name)[0]
        if current is None or current.key != key:
            current = SampleSpans(key, ok=key not in seen)
            samples.append(current)
            seen.add(key)
        offset = offsets[i]
        current.members.append(MemberSpan(name, offset, offset + BLOCK, sizes[i]))
    return samples


def _verify_checksums(blocks: np.ndarray, headers: list[bytes]) -> None:
    """Every header's unsigned checksum (its bytes summed, the checksum field read as spaces) is
    the one it stores; a damaged header anywhere sends the whole tar to the reader. The stored
    field is read for all headers at once in the usual form (six octal digits, NUL, space), and
    one by one otherwise."""
    sums = blocks.sum(axis=1, dtype=np.int64) - blocks[:, 148:156].sum(axis=1, dtype=np.int64) + _CHECKSUM_FIELD_AS_SPACES
    field = blocks[:, 148:156].astype(np.int64)
    usual = np.all((field[:, :6] >= ord("0")) & (field[:, :6] <= ord("7")), axis=1) & (field[:, 6] == 0) & (field[:, 7] == ord(" "))
    stored = (field[:, :6] - ord("0")) @ (8 ** np.arange(5, -1, -1, dtype=np.int64))
    for i in np.flatnonzero(~usual).tolist():
        stored[i] = _octal(headers[i][148:156])
    if not np.array_equal(sums, stored):
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
