"""Where each sample's members lie in a tar, so the writer copies kept samples as raw byte ranges
(headers included) instead of parsing and re-packing every member in Python.

img2dataset writes plain ustar tars: one 512-byte header per member, then its data. Such a tar is
walked here header by header (checksum, octal size, name), seeking over the data. Anything else
(PAX or GNU long-name headers, links, devices, unsafe or non-UTF-8 names, a damaged or cut tar)
is read by `prune.io.shards.iter_tar_samples` itself, whose TarInfo offsets give the spans, so
the samples and their statuses are always the reader's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, NamedTuple

import numpy as np

from prune import schema
from prune.io.shards import TarSample, is_unsafe_name, iter_tar_samples, split_member_name
from prune.io.span_copy import positional_reader

BLOCK = 512
ZERO_BLOCK = b"\0" * BLOCK
END_OF_ARCHIVE = ZERO_BLOCK * 2
RECORD = 20 * BLOCK  # tar and GNU tar pad an archive to a whole record
READ_AHEAD = 4096  # a header and the next ones within reach: one read per web sample, not per member
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


@dataclass
class TarIndex:
    """Every sample of a tar as columns, a row per member and no Python object per member: the
    writer picks its kept samples' spans with numpy. Sample i's members are rows bounds[i]:bounds[i+1]."""

    keys: list[str]  # per sample, in tar order
    ok: list[bool]  # per sample: the reader's status is ok
    bounds: np.ndarray  # int64 [samples + 1]
    names: list[str]  # per member
    header_at: np.ndarray  # int64 per member: its first header block
    data_at: np.ndarray  # int64 per member
    sizes: np.ndarray  # int64 per member

    @classmethod
    def from_samples(cls, samples: list[SampleSpans]) -> TarIndex:
        members = [m for s in samples for m in s.members]
        columns = np.array([m[1:] for m in members], np.int64).reshape(len(members), 3)
        return cls([s.key for s in samples], [s.ok for s in samples],
                   np.cumsum([0] + [len(s.members) for s in samples], dtype=np.int64),
                   [m.name for m in members], columns[:, 0], columns[:, 1], columns[:, 2])

    def samples(self) -> list[SampleSpans]:
        members = list(map(MemberSpan._make, zip(self.names, self.header_at.tolist(), self.data_at.tolist(), self.sizes.tolist())))
        b = self.bounds.tolist()
        return [SampleSpans(key, members[b[i] : b[i + 1]], ok) for i, (key, ok) in enumerate(zip(self.keys, self.ok))]

    def spans(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The member spans of samples `rows`, flat: (list offsets [len(rows) + 1]: sample j's
        spans are entries list_offsets[j]:list_offsets[j+1], span offsets, span lengths)."""
        rows = np.asarray(rows, np.int64)
        starts, counts = self.bounds[rows], self.bounds[rows + 1] - self.bounds[rows]
        list_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        member = np.arange(list_offsets[-1]) - np.repeat(list_offsets[:-1] - starts, counts)
        ends = self.data_at[member] + (self.sizes[member] + BLOCK - 1) // BLOCK * BLOCK
        return list_offsets, self.header_at[member], ends - self.header_at[member]

    def member(self, row: int, extensions) -> MemberSpan | None:
        """Sample `row`'s first member whose extension is in `extensions` (as `SampleSpans.member`)."""
        for i in range(int(self.bounds[row]), int(self.bounds[row + 1])):
            if split_member_name(self.names[i])[1].lower() in extensions:
                return MemberSpan(self.names[i], int(self.header_at[i]), int(self.data_at[i]), int(self.sizes[i]))
        return None


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
    read = positional_reader(f)
    offset = window_at = 0
    window = b""
    while True:
        at = offset - window_at
        if at + BLOCK > len(window):  # small members lie close together: one read finds several headers
            window, window_at, at = read(offset, READ_AHEAD), offset, 0
        header = window[at : at + BLOCK]
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


def _plain_index(f, file_size: int) -> TarIndex:
    headers, offsets, sizes = _headers(f, file_size)
    if not headers:
        return TarIndex.from_samples([])
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
    files = np.flatnonzero(is_file)
    file_names = names if len(files) == len(names) else [names[i] for i in files.tolist()]
    if not prefixed.any() and not odd.any():  # no directories in any name: the key ends at the first dot
        member_keys = [name.partition(".")[0] for name in file_names]
    else:
        member_keys = [split_member_name(name)[0] for name in file_names]
    # a sample is a run of members with one key; a key seen in an earlier run is the reader's duplicate
    bounds = [0, *[i for i in range(1, len(member_keys)) if member_keys[i] != member_keys[i - 1]]]
    keys = [member_keys[i] for i in bounds] if member_keys else []
    seen: set[str] = set()
    ok = []
    for key in keys:
        ok.append(key not in seen)
        seen.add(key)
    at = np.asarray(offsets, np.int64)[files]
    return TarIndex(keys, ok, np.array(bounds[: len(keys)] + [len(member_keys)], np.int64), file_names,
                    at, at + BLOCK, np.asarray(sizes, np.int64)[files])


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


def index_of_reader(samples: Iterable[TarSample], ok_statuses: tuple = (schema.STATUS_OK,)) -> TarIndex:
    """The TarIndex of the reader's samples (`iter_tar_samples`, `read_shard`), from their TarInfo
    offsets; a sample is ok when its status is one of `ok_statuses`."""
    return TarIndex.from_samples([
        SampleSpans(s.key, [MemberSpan(i.name, i.offset, i.offset_data, i.size) for i, _ in s.members],
                    s.status in ok_statuses)
        for s in samples
    ])


def ensure_uncompressed(f) -> None:
    """Raises CompressedTar for a compressed tar (the reader opens one transparently, but its
    offsets then count the decompressed stream: raw spans of the file mean nothing)."""
    f.seek(0)
    if f.read(6).startswith(_COMPRESSED):
        raise CompressedTar("a compressed tar: pruned shards copy the members of uncompressed tars only")


def tar_index(f) -> TarIndex:
    """Every sample of a seekable tar, in order, with its members' byte spans and whether it is ok.
    Raises CompressedTar for a compressed one, tarfile.ReadError for one that is no tar."""
    ensure_uncompressed(f)
    file_size = f.seek(0, 2)
    try:
        return _plain_index(f, file_size)
    except _NotPlain:
        f.seek(0)
        return index_of_reader(iter_tar_samples(f))


def read_member(f, member: MemberSpan) -> bytes:
    """One member's data, read from the open tar without touching the rest."""
    f.seek(member.data_at)
    return f.read(member.size)


def finish_archive(dst, written: int) -> None:
    """The end-of-archive blocks, padded to a whole record as tar writes it."""
    end = written + len(END_OF_ARCHIVE)
    dst.write(END_OF_ARCHIVE + b"\0" * (-end % RECORD))
