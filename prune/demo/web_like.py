"""A Fashion-MNIST pool shaped like a web crawl, to evaluate pruning where it matters.

The balanced demo shards have none of what pruning is for on web data: the classes are equal,
nothing is duplicated and nothing is junk. This pool, built from the train split, has
long-tailed classes, many altered near-copies of a few popular images and a little
off-distribution junk, and web-like captions (prune/demo/captions.py): most describe the
image, some name another class, some say nothing. Each sample's `.json` and parquet row say
what it is (`kind`, and `copy_of` for copies) and what its caption is (`caption_kind`,
`caption_label`, `caption_copied`) so an evaluation can score what a pruning run kept; the
pipeline itself reads only the images and the captions.

The layout is write_demo_shards': 9-digit keys, NNNNN.tar / .parquet / _stats.json, and the
tars are byte-reproducible for the same arguments. A `composition.json` beside the shards
sums the pool up.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import numpy as np
import pyarrow as pa
from PIL import Image

from prune.demo.captions import (
    CAPTION_KINDS,
    Caption,
)
from prune.demo.captions import caption_mix as complete_mix
from prune.demo.fashion_mnist import CLASS_NAMES, DEFAULT_ROOT, load_fashion_mnist
from prune.demo.pool_captions import KIND_COPY, KIND_JUNK, KIND_ORIGINAL, KINDS, CaptionPlan, apportion  # noqa: F401 (KINDS: re-exported)
from prune.demo.shards import (
    MAX_SHARD_SIZE,
    PARQUET_SCHEMA,
    _write_atomically,
    encode_image,
    sample_key,
    uid_for,
    write_shard_files,
)

JUNK_LABEL = -1  # junk has no class; evaluation's label reader skips negative labels
JUNK_LABEL_NAME = "junk"
JUNK_PATTERNS = ("noise", "flat", "stripes", "checkerboard", "gradient")

COMPOSITION_FILE = "composition.json"  # not a shard: no `*.tar` glob or NNNNN pattern matches it
SPLIT = "train"  # the test split stays untouched, for evaluating what was trained on the pool

DEFAULT_IMBALANCE = 20.0
DEFAULT_COPY_SHARE = 0.3
DEFAULT_JUNK_SHARE = 0.03
DEFAULT_COPY_EXPONENT = 1.0
DEFAULT_COPY_SAME_CAPTION = 0.5  # a copy carries its original's caption verbatim half the time

# The json/parquet fields this pool adds to write_demo_shards'.
WEB_LIKE_SCHEMA = pa.schema([
    *PARQUET_SCHEMA,
    pa.field("kind", pa.string()),
    pa.field("copy_of", pa.string()),
    pa.field("caption_kind", pa.string()),  # one of captions.CAPTION_KINDS
    pa.field("caption_label", pa.int64()),  # the class the caption names (describes, wrong), else null
    pa.field("caption_copied", pa.bool_()),  # a copy carrying its original's caption verbatim
])
# The caption plan and texts draw from their own generators, seeded by (seed, this, ...): the
# images are those the same seed gave before captions varied, whatever the caption settings.


@dataclass(frozen=True)
class WebLikePool:
    tars: list[str]  # the shard paths, in order
    composition: dict  # what composition.json holds


def write_web_like_shards(
    out_dir: str,
    count: int = 2000,
    shard_size: int = 500,
    seed: int = 0,
    imbalance: float = DEFAULT_IMBALANCE,
    copy_share: float = DEFAULT_COPY_SHARE,
    junk_share: float = DEFAULT_JUNK_SHARE,
    popular: int | None = None,
    copy_exponent: float = DEFAULT_COPY_EXPONENT,
    caption_mix: Mapping[str, float] | None = None,
    copy_same_caption: float = DEFAULT_COPY_SAME_CAPTION,
    root: str = DEFAULT_ROOT,
) -> WebLikePool:
    """Write a web-like pool of `count` samples as shards 00000.tar, ... in out_dir.

    - round(count * junk_share) junk images, label -1;
    - round(count * copy_share) altered copies (crop + resize, shift, brightness, JPEG at a
      random quality) of `popular` originals (default about sqrt(copies)), chosen uniformly
      among the originals (so mostly from the big classes), with Zipf(copy_exponent) counts;
    - the rest are originals, drawn without replacement per class; class sizes fall
      exponentially from the largest to the smallest, `imbalance` times smaller. Which class
      is largest is drawn from `seed`;
    - captions: of the originals and copies, `caption_mix` shares (kind -> share; kinds not
      named 0, `describes` the rest; default captions.DEFAULT_CAPTION_MIX) describe the image, name
      another class, or say nothing (noise, empty, spam), counts exact to rounding; junk
      images say nothing, in the say-nothing kinds' proportions (noise alone if those are 0).
      A share `copy_same_caption` of the copies carry their original's caption verbatim
      (kinds are traded with a sample of no family to keep the counts; where none is left the
      copy keeps its own); the rest have captions of their own.

    Samples are shuffled across shards and no two of one family (an original and its copies)
    sit next to each other where that can be avoided.
    """
    plan = _plan(count, shard_size, imbalance, copy_share, junk_share, popular, copy_exponent,
                 caption_mix, copy_same_caption)
    images, labels = load_fashion_mnist(SPLIT, root)
    rng = np.random.default_rng(seed)
    ranked = rng.permutation(len(CLASS_NAMES))  # ranked[r]: the class with the r-th largest size
    originals = []
    for rank, size in enumerate(plan["class_sizes"]):
        pool = np.flatnonzero(labels == ranked[rank])
        if size > len(pool):
            raise ValueError(
                f"count={count} with imbalance={imbalance} needs {size} originals of class "
                f"{CLASS_NAMES[ranked[rank]]!r}, the {SPLIT} split has {len(pool)}: lower count or imbalance"
            )
        originals += sorted(rng.choice(pool, size, replace=False).tolist())
    sources = rng.choice(originals, plan["popular"], replace=False).tolist()  # in Zipf rank order

    items = [{"kind": KIND_ORIGINAL, "index": i} for i in originals]
    items += [{"kind": KIND_COPY, "index": s, "n": n} for s, c in zip(sources, plan["copies"]) for n in range(c)]
    items += [{"kind": KIND_JUNK, "index": None, "pattern": JUNK_PATTERNS[j % len(JUNK_PATTERNS)], "n": j}
              for j in range(plan["junk"])]
    items = _spread_families([items[i] for i in rng.permutation(len(items))], rng)

    keys = [sample_key(p // shard_size, p % shard_size) for p in range(len(items))]
    original_key = {it["index"]: k for it, k in zip(items, keys) if it["kind"] == KIND_ORIGINAL}
    captions = CaptionPlan(items, images, plan["caption_mix"], plan["copy_same_caption"], seed)
    os.makedirs(out_dir, exist_ok=True)
    tars = []
    for shard, first in enumerate(range(0, count, shard_size)):
        start_time = time.time()
        members, rows = [], []
        for pos in range(first, min(first + shard_size, count)):
            key = keys[pos]
            image, meta = _sample(items[pos], key, images, labels, original_key, rng, partial(captions.at, pos))
            members += [(f"{key}.jpg", image), (f"{key}.txt", meta["caption"].encode())]
            members.append((f"{key}.json", json.dumps(meta).encode()))
            rows.append(meta)
        tars.append(write_shard_files(out_dir, shard, members, rows, WEB_LIKE_SCHEMA, start_time))

    composition = _composition(plan, items, original_key, tars, seed, imbalance, copy_share, junk_share, labels,
                               captions)
    _write_atomically(os.path.join(out_dir, COMPOSITION_FILE), json.dumps(composition, indent=2).encode())
    return WebLikePool(tars, composition)


def _plan(count, shard_size, imbalance, copy_share, junk_share, popular, copy_exponent,
          mix=None, copy_same_caption=DEFAULT_COPY_SAME_CAPTION) -> dict:
    """Check the arguments and size every part of the pool, before any image is read."""
    if not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    if not 0 < shard_size <= MAX_SHARD_SIZE:
        raise ValueError(f"shard_size must be in 1..{MAX_SHARD_SIZE}, got {shard_size}")
    if not imbalance >= 1:  # also rejects NaN
        raise ValueError(f"imbalance (largest class / smallest class) must be >= 1, got {imbalance}")
    for name, share in (("copy_share", copy_share), ("junk_share", junk_share)):
        if not 0 <= share < 1:
            raise ValueError(f"{name} must be in [0, 1), got {share}")
    if copy_share + junk_share >= 1:
        raise ValueError(f"copy_share + junk_share must be < 1 (originals are the rest), got {copy_share + junk_share}")
    if not copy_exponent >= 0:
        raise ValueError(f"copy_exponent must be >= 0, got {copy_exponent}")
    try:
        mix = complete_mix(mix)
    except ValueError as exc:
        raise ValueError(f"caption_mix: {exc}") from None
    if isinstance(copy_same_caption, bool) or not 0 <= copy_same_caption <= 1:
        raise ValueError(f"copy_same_caption must be in [0, 1], got {copy_same_caption!r}")
    n_junk, n_copy = round(count * junk_share), round(count * copy_share)
    n_orig = count - n_junk - n_copy
    n_classes = len(CLASS_NAMES)
    weights = float(imbalance) ** (-np.arange(n_classes) / (n_classes - 1))
    class_sizes = apportion(n_orig, weights)
    if n_orig < 1 or class_sizes[-1] < 1:
        raise ValueError(
            f"count={count} leaves {n_orig} originals: too few for {n_classes} classes with imbalance={imbalance} "
            "(the smallest class would be empty): raise count or lower imbalance, copy_share or junk_share"
        )
    if popular is None:
        popular = min(n_orig, max(1, round(n_copy**0.5))) if n_copy else 0
    elif not isinstance(popular, (int, np.integer)) or not (1 if n_copy else 0) <= popular <= min(n_copy, n_orig):
        raise ValueError(f"popular must be in {1 if n_copy else 0}..{min(n_copy, n_orig)} "
                         f"(the number of copies, at most the originals), got {popular!r}")
    zipf = 1.0 / np.arange(1, popular + 1) ** copy_exponent
    copies = [1 + extra for extra in apportion(n_copy - popular, zipf)] if popular else []
    return {"class_sizes": class_sizes, "copies": copies, "popular": popular, "junk": n_junk,
            "caption_mix": mix, "copy_same_caption": float(copy_same_caption)}


def _spread_families(items: list[dict], rng, tries: int = 64) -> list[dict]:
    """Swap samples apart where two of one family (an original and its copies) are neighbours.

    Each pair gets `tries` random partners to swap with; a swap is made only if it creates no
    new pair. A family larger than half the pool cannot be spread and keeps some neighbours.
    """
    def family(i):
        return items[i]["index"] if 0 <= i < len(items) else None

    def related(a, b):
        fa = family(a)
        return fa is not None and fa == family(b)

    def fits(src, dst):  # the sample at src, moved to dst (not a neighbour of src), has no relative beside it
        f = family(src)
        return f is None or f not in (family(dst - 1), family(dst + 1))

    n = len(items)
    for i in range(1, n):
        if not related(i - 1, i):
            continue
        for j in rng.integers(0, n, size=tries).tolist():
            if abs(j - i) <= 1 or not (fits(i, j) and fits(j, i)):
                continue
            items[i], items[j] = items[j], items[i]
            break
    return items


def _sample(item, key, images, labels, original_key, rng,
            caption_of: Callable[[int, np.ndarray], tuple[Caption, bool]]) -> tuple[bytes, dict]:
    """A sample's jpg bytes and its metadata (the json member and the parquet row);
    caption_of(label, pixels) gives its caption and whether it is its original's."""
    kind, index = item["kind"], item["index"]
    copy_of = None
    if kind == KIND_JUNK:
        pixels = _junk(item["pattern"], rng)
        image = encode_image(pixels)
        label, label_name = JUNK_LABEL, JUNK_LABEL_NAME
        url = f"https://example.invalid/web-like/junk/{item['pattern']}/{item['n']}.jpg"
    else:
        label = int(labels[index])
        label_name = CLASS_NAMES[label]
        if kind == KIND_ORIGINAL:
            pixels = images[index]
            image = encode_image(pixels)
            url = f"https://example.invalid/fmnist/{SPLIT}/{index}.jpg"
        else:
            pixels, quality = _alter(images[index], rng)
            image = encode_image(pixels, quality=quality)
            url = f"https://example.invalid/web-like/copy/{index}-{item['n']}.jpg"
            copy_of = original_key[index]
    caption, copied = caption_of(label, pixels)
    side = images.shape[1]
    meta = {
        "key": key, "uid": uid_for(url, caption.text), "url": url, "caption": caption.text, "status": "success",
        "error_message": None, "width": side, "height": side, "original_width": side, "original_height": side,
        "exif": None, "sha256": hashlib.sha256(image).hexdigest(), "label": label, "label_name": label_name,
        "index": None if index is None else int(index), "split": SPLIT, "kind": kind, "copy_of": copy_of,
        "caption_kind": caption.kind, "caption_label": caption.label, "caption_copied": copied,
    }
    return image, meta


def _alter(pixels: np.ndarray, rng) -> tuple[np.ndarray, int]:
    """A web-style near-copy: crop 85-96% of the side and resize back, shift by up to a pixel,
    scale brightness by 0.7-1.3; returns the pixels and a JPEG quality in 30..95 to save them at.

    Mild on purpose: on 28-pixel images a 2-pixel shift or a 75% crop already leaves a copy
    further, in pixels, from its original than most images of the same class are.
    """
    side = pixels.shape[0]
    crop = int(rng.integers(round(0.85 * side), side))  # never the whole image: every copy is altered
    x0, y0 = rng.integers(0, side - crop + 1, size=2)
    cropped = Image.fromarray(pixels).crop((int(x0), int(y0), int(x0) + crop, int(y0) + crop))
    out = np.asarray(cropped.resize((side, side), Image.BILINEAR), dtype=np.float64)
    dy, dx = (int(d) for d in rng.integers(-1, 2, size=2))
    out = np.roll(out, (dy, dx), axis=(0, 1))  # then blank what wrapped round: a shift
    out[: max(dy, 0)], out[side + min(dy, 0) :] = 0, 0
    out[:, : max(dx, 0)], out[:, side + min(dx, 0) :] = 0, 0
    out = np.clip(out * rng.uniform(0.7, 1.3), 0, 255).round().astype(np.uint8)
    return out, int(rng.integers(30, 96))


def _junk(pattern: str, rng, side: int = 28) -> np.ndarray:
    """An off-distribution image. Fashion-MNIST is a bright object on black (a quarter to most
    of its pixels are dark); here no level is below 40 except in noise, uniform over 0..255."""
    y, x = np.mgrid[0:side, 0:side]
    lo, hi = int(rng.integers(40, 111)), int(rng.integers(150, 256))
    if pattern == "noise":
        return rng.integers(0, 256, size=(side, side), dtype=np.uint8)
    if pattern == "flat":
        return np.full((side, side), int(rng.integers(40, 256)), np.uint8)
    if pattern == "stripes":
        coord = (y, x, x + y)[int(rng.integers(0, 3))]
        on = (coord // int(rng.integers(2, 8))) % 2 == 1
    elif pattern == "checkerboard":
        cell = int(rng.integers(2, 8))
        on = (y // cell + x // cell) % 2 == 1
    elif pattern == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = x * np.cos(angle) + y * np.sin(angle)
        t = (t - t.min()) / (t.max() - t.min())
        return (lo + (hi - lo) * t).round().astype(np.uint8)
    else:
        raise ValueError(f"pattern must be one of {JUNK_PATTERNS}, got {pattern!r}")
    return np.where(on, hi, lo).astype(np.uint8)


def _composition(plan, items, original_key, tars, seed, imbalance, copy_share, junk_share, labels,
                 captions: CaptionPlan) -> dict:
    """The summary composition.json holds: counts per kind, per class, of the copies and of the captions."""
    kinds = {k: sum(it["kind"] == k for it in items) for k in KINDS}
    caption_kinds = {k: captions.kinds.count(k) for k in CAPTION_KINDS}
    per_kind = {kind: {k: 0 for k in CAPTION_KINDS} for kind in KINDS}
    for it, k in zip(items, captions.kinds):
        per_kind[it["kind"]][k] += 1

    def per_class(kind):
        counts = np.bincount([labels[it["index"]] for it in items if it["kind"] == kind], minlength=len(CLASS_NAMES))
        return {name: int(c) for name, c in zip(CLASS_NAMES, counts)}

    copies_per_source: dict[str, int] = {}
    for it in items:
        if it["kind"] == KIND_COPY:
            source = original_key[it["index"]]
            copies_per_source[source] = copies_per_source.get(source, 0) + 1
    sizes = plan["class_sizes"]
    return {
        "split": SPLIT, "count": len(items), "seed": seed, "imbalance": imbalance,
        "copy_share": copy_share, "junk_share": junk_share,
        "shards": [os.path.basename(t) for t in tars],
        "kinds": kinds,
        "originals_per_class": per_class(KIND_ORIGINAL),
        "copies_per_class": per_class(KIND_COPY),
        "largest_over_smallest_class": sizes[0] / sizes[-1],
        "popular_sources": plan["popular"],
        "max_copies_of_one_source": max(plan["copies"], default=0),
        "copies_per_source": dict(sorted(copies_per_source.items(), key=lambda kv: (-kv[1], kv[0]))),
        "junk_patterns": {p: sum(it.get("pattern") == p for it in items) for p in JUNK_PATTERNS},
        "caption_mix": plan["caption_mix"],
        "copy_same_caption": plan["copy_same_caption"],
        "caption_kinds": caption_kinds,
        "caption_kinds_per_kind": per_kind,
        "copies_with_original_caption": sum(c is not None for c in captions.copied_from),
    }
