"""Synthetic web photos in img2dataset shards: JPEGs with LAION's sizes, for throughput measurements.

The Fashion-MNIST shards are 28 px images that cost nothing to decode, and the dataset is a system
package a bare GPU machine lacks. A throughput measurement needs what a web crawl costs to decode:
photos of 256 to 1024 px on their longer side, landscape and portrait, at JPEG qualities 70 to 95
(a tenth progressive), with smooth regions, hard edges and sensor-like noise, so that the files
weigh what web photos of those sizes do (tens to a hundred KB). They are made from nothing but
numpy and PIL, in parallel processes, deterministically for a seed: image i of a seed is always
the same bytes. Keys, members (`.jpg`, `.txt`, `.json`) and the files beside each tar (parquet,
stats) are img2dataset's, as in prune/demo/shards.py.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import time

import numpy as np
import pyarrow as pa
from PIL import Image, ImageChops, ImageDraw

from prune.demo.shards import MAX_SHARD_SIZE, sample_key, write_shard_files

MIN_SIDE, MAX_SIDE = 256, 1024  # the longer side's range
PHOTO_SCHEMA = pa.schema([
    ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()), ("status", pa.string()),
    ("width", pa.int64()), ("height", pa.int64()), ("original_width", pa.int64()), ("original_height", pa.int64()),
    ("jpeg_quality", pa.int64()), ("progressive", pa.bool_()),
])
_WORDS = ("a photo of", "close-up of", "stock image:", "view of", "vintage", "red", "blue", "small", "large",
          "house", "dog", "street", "table", "mountain", "shoe", "car", "flower", "beach", "city", "cup")
_CHUNK = 64  # photos per job of a worker process


def photo(seed: int, index: int) -> tuple[bytes, dict]:
    """Photo `index` of `seed`: its JPEG bytes and what it is (size, quality, caption)."""
    rng = np.random.default_rng([seed, index])
    longer = int(np.exp(rng.uniform(np.log(MIN_SIDE), np.log(MAX_SIDE))))
    aspect = float(np.exp(rng.uniform(0.0, np.log(2.0))))  # 1:1 to 2:1
    shorter = max(MIN_SIDE * 3 // 4, int(longer / aspect))
    w, h = (longer, shorter) if rng.random() < 0.7 else (shorter, longer)
    # smooth colour fields (sky, walls, out-of-focus background), then objects with hard edges
    grid = rng.integers(0, 256, (int(rng.integers(2, 8)), int(rng.integers(2, 8)), 3), dtype=np.uint8)
    img = Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 12))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = (x0, y0, x0 + int(rng.integers(10, w // 2 + 11)), y0 + int(rng.integers(10, h // 2 + 11)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = int(rng.integers(0, 3))
        if shape == 0:
            draw.ellipse(box, fill=colour)
        elif shape == 1:
            draw.rectangle(box, fill=colour)
        else:
            points = [(int(x), int(y)) for x, y in rng.integers(0, [w, h], (6, 2))]
            draw.line(points, fill=colour, width=int(rng.integers(1, 8)))
    # sensor noise and texture: what makes a photo's JPEG weigh what it does
    amp = int(rng.integers(6, 30))
    noise = Image.fromarray((rng.integers(0, amp + 1, (h, w), dtype=np.uint8) + (128 - amp // 2)).astype(np.uint8))
    img = ImageChops.add(img, Image.merge("RGB", (noise, noise, noise)), 1.0, -128)
    quality, progressive = int(rng.integers(70, 96)), bool(rng.random() < 0.1)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, progressive=progressive)
    words = rng.choice(len(_WORDS), int(rng.integers(2, 6)), replace=False)
    caption = " ".join(_WORDS[i] for i in sorted(words))
    return buf.getvalue(), {"width": w, "height": h, "jpeg_quality": quality, "progressive": progressive,
                            "caption": caption}


def _photos(job: tuple[int, int, int]) -> list[tuple[bytes, dict]]:
    seed, first, n = job
    return [photo(seed, i) for i in range(first, first + n)]


def write_photo_shards(out_dir: str, count: int, shard_size: int = 1000, seed: int = 0,
                       processes: int | None = None) -> list[str]:
    """Write `count` photos as img2dataset shards 00000.tar, ... of `shard_size` samples in out_dir,
    made by `processes` worker processes (default: every core); returns the tar paths in order."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if not 0 < shard_size <= MAX_SHARD_SIZE:
        raise ValueError(f"shard_size must be in 1..{MAX_SHARD_SIZE}, got {shard_size}")
    os.makedirs(out_dir, exist_ok=True)
    jobs = [(seed, first, min(_CHUNK, count - first)) for first in range(0, count, _CHUNK)]
    processes = max(1, min(processes or os.cpu_count() or 1, len(jobs)))
    tars, members, rows = [], [], []
    start_time = time.time()

    def add(made: list[tuple[bytes, dict]]) -> None:
        nonlocal start_time
        for image, meta in made:
            pos = len(tars) * shard_size + len(rows)
            key = sample_key(pos // shard_size, pos % shard_size)
            url = f"https://example.invalid/photos/{seed}/{pos}.jpg"
            row = {"key": key, "url": url, "status": "success", "original_width": meta["width"],
                   "original_height": meta["height"], **meta}
            members.extend([(f"{key}.jpg", image), (f"{key}.txt", meta["caption"].encode()),
                            (f"{key}.json", json.dumps(row).encode())])
            rows.append(row)
            if len(rows) == shard_size or pos + 1 == count:
                tars.append(write_shard_files(out_dir, len(tars), members, rows, PHOTO_SCHEMA, start_time))
                members.clear()
                rows.clear()
                start_time = time.time()

    if processes == 1:
        for job in jobs:
            add(_photos(job))
        return tars
    # forkserver: safe beside threads the caller may run (Ray, torch); the chunks come back in order
    with multiprocessing.get_context("forkserver").Pool(processes) as pool:
        for made in pool.imap(_photos, jobs, chunksize=1):
            add(made)
    return tars
