"""Write img2dataset-style WebDataset shards from real Fashion-MNIST images.

The demo and the tests need input that looks exactly like img2dataset's webdataset output
(tars, parquet and stats side by side, 9-digit keys) but carries known labels, so pruning
quality can be measured. `write_bad_shards` derives the malformed inputs a robust reader must
survive from a real good shard.

Every file is written to a hidden temporary name and renamed when complete, and the tars are
byte-reproducible for the same arguments (fixed permutation seed, mtime, owner and order).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from prune.demo.fashion_mnist import CLASS_NAMES, DEFAULT_ROOT, load_fashion_mnist
from prune.schema import (
    SHARD_NOT_A_TAR,
    STATS_SUFFIX,
    STATUS_EMPTY,
    STATUS_NO_IMAGE,
    STATUS_OK,
    STATUS_TRUNCATED,
    STATUS_UNDECODABLE,
    STATUS_UNSAFE_NAME,
    shard_id_of,
)

DEMO_MTIME = 946_684_800  # 2000-01-01: a fixed member mtime makes the tars byte-reproducible
MAX_SHARD_SIZE = 10_000  # img2dataset keys give the index in the shard 4 digits

# image_format -> (PIL format, save options)
_ENCODINGS = {
    "jpg": ("JPEG", {"quality": 95}),
    "jpeg": ("JPEG", {"quality": 95}),
    "png": ("PNG", {}),
    "webp": ("WEBP", {"quality": 95}),
}

# img2dataset's parquet columns, DataComp's `uid`, plus the Fashion-MNIST ground truth.
PARQUET_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("uid", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("original_width", pa.int64()),
        ("original_height", pa.int64()),
        ("exif", pa.string()),
        ("sha256", pa.string()),
        ("label", pa.int64()),
        ("label_name", pa.string()),
        ("index", pa.int64()),
    ]
)


def shard_name(shard: int) -> str:
    """img2dataset's shard file stem: the shard number in 5 digits, e.g. "00001"."""
    return f"{shard:05d}"


def sample_key(shard: int, index_in_shard: int) -> str:
    """img2dataset's sample key: 5-digit shard number then 4-digit index, e.g. "000010005"."""
    return f"{shard:05d}{index_in_shard:04d}"


def uid_for(url: str, caption: str) -> str:
    """A DataComp-style uid: 128 bits as 32 hex digits, stable for a (url, caption) pair."""
    return hashlib.md5(f"{url}\t{caption}".encode()).hexdigest()


def caption_for(label_name: str) -> str:
    article = "an" if label_name[0] in "aeiou" else "a"
    return f"a photo of {article} {label_name}"


def encode_image(pixels: np.ndarray, image_format: str = "jpg", quality: int | None = None) -> bytes:
    """Encode a grayscale uint8 array as-is (mode "L"): converting to RGB is the reader's job.

    `quality` overrides the format's default (lossy formats only), for re-encoded web copies.
    """
    fmt, options = _ENCODINGS[image_format]
    if quality is not None:
        options = {**options, "quality": quality}
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format=fmt, **options)
    return buf.getvalue()


def write_demo_shards(
    out_dir: str,
    split: str = "train",
    count: int = 2000,
    shard_size: int = 500,
    seed: int = 0,
    start: int = 0,
    image_format: str = "jpg",
    root: str = DEFAULT_ROOT,
    captions: str = "class",
) -> list[str]:
    """Write `count` Fashion-MNIST images as shards 00000.tar, 00001.tar, ... in out_dir.

    `captions`: "class" ("a photo of a <class>") or "describe" (the web-like pool's describing
    captions, prune/demo/captions.py, seeded by `seed`): held-out pairs for the pretraining judge's
    retrieval, worded as the pool's describing captions are.

    The images are positions [start, start + count) of a permutation of the split seeded by
    `seed`, so calls with the same seed and non-overlapping ranges (into different directories:
    shard numbers always start at 0) give disjoint sets. Returns the tar paths.
    """
    if image_format not in _ENCODINGS:
        raise ValueError(f"image_format must be one of {sorted(_ENCODINGS)}, got {image_format!r}")
    if captions not in CAPTION_STYLES:
        raise ValueError(f"captions must be one of {list(CAPTION_STYLES)}, got {captions!r}")
    if not 0 < shard_size <= MAX_SHARD_SIZE:
        raise ValueError(f"shard_size must be in 1..{MAX_SHARD_SIZE}, got {shard_size}")
    images, labels = load_fashion_mnist(split, root)
    if count < 1 or start < 0 or start + count > len(images):
        raise ValueError(f"need start >= 0, count >= 1, start + count <= {len(images)}; got {start=}, {count=}")
    order = np.random.default_rng(seed).permutation(len(images))[start : start + count]
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng([seed, _DESCRIBE_STREAM]) if captions == "describe" else None
    return [
        _write_shard(out_dir, shard, split, images, labels, order[first : first + shard_size], image_format, rng)
        for shard, first in enumerate(range(0, count, shard_size))
    ]


CAPTION_STYLES = ("class", "describe")
_DESCRIBE_STREAM = 0xDE5


def _write_shard(out_dir, shard, split, images, labels, indices, image_format, describe_rng=None) -> str:
    start_time = time.time()
    members, rows = [], []
    for i, index in enumerate(indices):
        key = sample_key(shard, i)
        image = encode_image(images[index], image_format)
        height, width = images[index].shape
        label_name = CLASS_NAMES[labels[index]]
        if describe_rng is None:
            caption = caption_for(label_name)
        else:
            from prune.demo.captions import describe

            caption = describe(int(labels[index]), images[index], describe_rng)
        url = f"https://example.invalid/fmnist/{split}/{index}.jpg"
        meta = {
            "key": key,
            "uid": uid_for(url, caption),
            "url": url,
            "caption": caption,
            "status": "success",
            "error_message": None,
            "width": width,
            "height": height,
            "original_width": width,
            "original_height": height,
            "exif": None,
            "sha256": hashlib.sha256(image).hexdigest(),
            "label": int(labels[index]),
            "label_name": label_name,
            "index": int(index),
            "split": split,
        }
        members += [(f"{key}.{image_format}", image), (f"{key}.txt", caption.encode())]
        members.append((f"{key}.json", _json(meta)))
        rows.append(meta)
    return write_shard_files(out_dir, shard, members, rows, PARQUET_SCHEMA, start_time)


def write_shard_files(out_dir, shard, members, rows, schema: pa.Schema, start_time: float) -> str:
    """Write shard NNNNN's tar (members in order), parquet (rows) and img2dataset stats; return the tar path."""
    stem = os.path.join(out_dir, shard_name(shard))
    _write_atomically(stem + ".tar", tar_bytes(members))
    _write_atomically(stem + ".parquet", _parquet_bytes(pa.Table.from_pylist(rows, schema=schema)))
    end_time = time.time()
    stats = {
        "count": len(rows),
        "successes": len(rows),
        "failed_to_download": 0,
        "failed_to_resize": 0,
        "duration": end_time - start_time,
        "start_time": start_time,
        "end_time": end_time,
        "status_dict": {"success": len(rows)},
    }
    _write_atomically(stem + STATS_SUFFIX, json.dumps(stats, indent=4).encode())
    return stem + ".tar"


def write_bad_shards(out_dir: str, good_tar: str) -> dict:
    """Write the malformed-input fixtures, numbered after the highest NNNNN.tar in out_dir.

    Built from the samples of `good_tar` (a jpg shard from write_demo_shards):

    - "mixed": good samples interleaved with a truncated JPEG and text saved as .jpg
      (STATUS_UNDECODABLE), a zero-byte .jpg (STATUS_EMPTY), a sample with only .txt/.json
      (STATUS_NO_IMAGE) and the members "../escape.jpg" and "/abs/evil.jpg"
      (STATUS_UNSAFE_NAME). A traversal member's key is its name without the extension,
      as webdataset groups it: "../escape" and "/abs/evil".
    - "truncated": a copy of the good shard (re-keyed to its own shard number) cut in the
      middle of an image's data. The samples before that one are intact (STATUS_OK); the cut
      one is STATUS_TRUNCATED; the samples after it are lost.
    - "not_a_tar": random bytes named NNNNN.tar (a shard-level SHARD_NOT_A_TAR).

    Returns {fixture: {"path", "shard", ...}}; "mixed" and "truncated" carry "expected",
    a {key: status} map of every sample a reader can see.
    """
    samples = _read_samples(good_tar)
    if len(samples) < 4 or any("jpg" not in members for _, members in samples):
        raise ValueError(f"{good_tar}: need a shard of at least 4 samples, each with a .jpg")
    first = _next_shard_number(out_dir, good_tar)
    return {
        "mixed": _write_mixed(out_dir, first, samples),
        "truncated": _write_truncated(out_dir, first + 1, samples),
        "not_a_tar": _write_not_a_tar(out_dir, first + 2),
    }


# Sample kinds of the mixed tar, in tar order; "ok" samples are copies of good ones.
_MIXED_PLAN = ("ok", "corrupt", "ok", "empty", "text", "escape", "ok", "no_image", "abs", "ok")
_UNSAFE_NAMES = {"escape": "../escape.jpg", "abs": "/abs/evil.jpg"}


def _write_mixed(out_dir: str, shard: int, samples) -> dict:
    members, expected = [], {}
    for i, kind in enumerate(_MIXED_PLAN):
        key = sample_key(shard, i)
        donor = samples[i % len(samples)][1]
        if kind in _UNSAFE_NAMES:
            name = _UNSAFE_NAMES[kind]
            members.append((name, donor["jpg"]))
            expected[name.rsplit(".", 1)[0]] = STATUS_UNSAFE_NAME
            continue
        image, status = {
            "ok": (donor["jpg"], STATUS_OK),
            "corrupt": (corrupt_jpeg(donor["jpg"]), STATUS_UNDECODABLE),
            "empty": (b"", STATUS_EMPTY),
            "text": (b"<html><body>404 Not Found</body></html>\n", STATUS_UNDECODABLE),
            "no_image": (None, STATUS_NO_IMAGE),
        }[kind]
        members += _rekeyed(key, donor, image)
        expected[key] = status
    path = os.path.join(out_dir, shard_name(shard) + ".tar")
    _write_atomically(path, tar_bytes(members))
    return {"path": path, "shard": shard_name(shard), "expected": expected}


def _write_truncated(out_dir: str, shard: int, samples) -> dict:
    keys = [sample_key(shard, i) for i in range(len(samples))]
    members = [m for key, (_, donor) in zip(keys, samples) for m in _rekeyed(key, donor, donor["jpg"])]
    data = tar_bytes(members)
    cut_index = len(keys) // 2
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        victim = tar.getmember(f"{keys[cut_index]}.jpg")
    cut_at = victim.offset_data + victim.size // 2
    path = os.path.join(out_dir, shard_name(shard) + ".tar")
    _write_atomically(path, data[:cut_at])
    expected = {key: STATUS_OK for key in keys[:cut_index]}
    expected[keys[cut_index]] = STATUS_TRUNCATED
    return {
        "path": path,
        "shard": shard_name(shard),
        "cut_at": cut_at,
        "complete_keys": keys[:cut_index],
        "truncated_key": keys[cut_index],
        "expected": expected,
    }


def _write_not_a_tar(out_dir: str, shard: int) -> dict:
    path = os.path.join(out_dir, shard_name(shard) + ".tar")
    _write_atomically(path, np.random.default_rng(shard).bytes(4096))
    return {"path": path, "shard": shard_name(shard), "shard_status": SHARD_NOT_A_TAR}


def corrupt_jpeg(jpeg: bytes) -> bytes:
    """Real JPEG bytes cut halfway through the entropy-coded data after the SOS header.

    The headers parse (Image.open succeeds) but decoding fails with "image file is truncated",
    unless a reader sets PIL.ImageFile.LOAD_TRUNCATED_IMAGES, which it should not.
    """
    sos = jpeg.find(b"\xff\xda")
    if sos < 0:
        raise ValueError("not a baseline JPEG: no SOS marker")
    return jpeg[: sos + (len(jpeg) - sos) // 2]


def _rekeyed(key: str, donor: dict, image: bytes | None) -> list[tuple[str, bytes]]:
    """A sample's members under a new key: the given image bytes (None: no image member),
    the donor's caption, and the donor's json with key and sha256 updated."""
    meta = json.loads(donor["json"])
    meta["key"] = key
    meta["sha256"] = hashlib.sha256(image).hexdigest() if image is not None else None
    members = [] if image is None else [(f"{key}.jpg", image)]
    return members + [(f"{key}.txt", donor["txt"]), (f"{key}.json", _json(meta))]


def _read_samples(tar_path: str) -> list[tuple[str, dict[str, bytes]]]:
    """[(key, {extension: bytes})] in tar order, grouping members on the name's first dot."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if member.isfile():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return list(samples.items())


def _next_shard_number(out_dir: str, good_tar: str) -> int:
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    names.append(os.path.basename(good_tar))
    numbers = [int(shard_id_of(n)) for n in names if re.fullmatch(r"\d{5}\.tar", n)]
    return max(numbers, default=-1) + 1


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar of (name, bytes) members in the given order, with fixed mtime and owner."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), DEMO_MTIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _json(obj: dict) -> bytes:
    return json.dumps(obj).encode()


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _write_atomically(path: str, data: bytes) -> None:
    """Write to a hidden temporary name beside `path`, then rename: readers never see a partial file."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
