"""Labels for evaluation: each sample's `.json` label joined with its embedding (and pixels)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from prune import schema
from prune.cluster.kmeans import l2_normalize
from prune.embed.decode import PreprocessSpec, decode_image
from prune.evaluate.layout import (
    CAPTION_KIND_FIELD,
    EXCLUDED_BAD_JSON,
    EXCLUDED_BAD_LABEL,
    EXCLUDED_NO_JSON,
    EXCLUDED_NO_LABEL,
    EXCLUDED_NOT_IN_TAR,
    JUNK_LABEL,
    KIND_FIELD,
    KIND_JUNK,
    KIND_ORIGINAL,
    LABEL_MEMBER,
)
from prune.io.shards import TarSample


def parse_label(data: Optional[bytes], label_field: str) -> tuple[Optional[int], Optional[str]]:
    """A sample's `.json` member -> (label, None) or (None, why it has no usable label)."""
    if data is None:
        return None, EXCLUDED_NO_JSON
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None, EXCLUDED_BAD_JSON
    if not isinstance(meta, dict) or meta.get(label_field) is None:
        return None, EXCLUDED_NO_LABEL
    value = meta[label_field]
    if isinstance(value, str) and value.strip().isdecimal():
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if value == JUNK_LABEL and meta.get(KIND_FIELD) == KIND_JUNK:
        return JUNK_LABEL, None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None, EXCLUDED_BAD_LABEL
    return value, None


def parse_kind(data: Optional[bytes], field: str = KIND_FIELD, default: Optional[str] = KIND_ORIGINAL) -> Optional[str]:
    """A sample's kind (original, copy, junk) from its `.json` member; original when it says none.
    `field=CAPTION_KIND_FIELD, default=None`: its caption's kind, None when it says none."""
    try:
        meta = json.loads(data) if data else {}
    except (ValueError, UnicodeDecodeError):
        return default
    if not isinstance(meta, dict) or not meta.get(field):
        return default
    return str(meta[field])


@dataclass
class LabeledSet:
    """Usable samples (ok embedding, integer label, decodable image when pixels are wanted)."""

    shards: np.ndarray  # object [n]: input shard id
    keys: np.ndarray  # object [n]
    labels: np.ndarray  # int64 [n]
    embeddings: np.ndarray  # float32 [n, d], unit norm
    pixels: Optional[np.ndarray]  # uint8 [n, s, s, 3], or None when no classifier needs them
    excluded: Counter = field(default_factory=Counter)  # reason -> samples left out
    shard_failures: dict = field(default_factory=dict)  # shard -> why it yielded no sample
    kinds: Optional[np.ndarray] = None  # object [n]: original, copy or junk (None: all original)
    clip_scores: Optional[np.ndarray] = None  # float32 [n]: caption-image cosine, NaN without a caption (None: none)
    captions: Optional[np.ndarray] = None  # object [n]: the .txt member ("" when none), when asked for
    caption_kinds: Optional[np.ndarray] = None  # object [n]: what the json says of the caption (None: not said)

    def __post_init__(self):
        if self.kinds is None:
            self.kinds = np.full(len(self.labels), KIND_ORIGINAL, dtype=object)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: np.ndarray) -> "LabeledSet":
        return LabeledSet(self.shards[idx], self.keys[idx], self.labels[idx], self.embeddings[idx],
                          None if self.pixels is None else self.pixels[idx], Counter(self.excluded),
                          dict(self.shard_failures), self.kinds[idx],
                          None if self.clip_scores is None else self.clip_scores[idx],
                          None if self.captions is None else self.captions[idx],
                          None if self.caption_kinds is None else self.caption_kinds[idx])

    @classmethod
    def concat(cls, parts: list["LabeledSet"], dim: int, pixel_size: Optional[int]) -> "LabeledSet":
        """Parts in shard order, so the set (and every selection from it) is the same on a re-run."""
        parts = sorted(parts, key=lambda p: (p.shards[0] if len(p) else "", len(p)))
        excluded, failures = Counter(), {}
        for p in parts:
            excluded.update(p.excluded)
            failures.update(p.shard_failures)
        nonempty = [p for p in parts if len(p)]
        if not nonempty:
            empty_pixels = None if pixel_size is None else np.zeros((0, pixel_size, pixel_size, 3), np.uint8)
            return cls(np.zeros(0, object), np.zeros(0, object), np.zeros(0, np.int64),
                       np.zeros((0, dim), np.float32), empty_pixels, excluded, failures)
        return cls(
            np.concatenate([p.shards for p in nonempty]), np.concatenate([p.keys for p in nonempty]),
            np.concatenate([p.labels for p in nonempty]), np.concatenate([p.embeddings for p in nonempty]),
            None if pixel_size is None else np.concatenate([p.pixels for p in nonempty]), excluded, failures,
            np.concatenate([p.kinds for p in nonempty]),
            _concat_optional([p.clip_scores for p in nonempty]), _concat_optional([p.captions for p in nonempty]),
            _concat_optional([p.caption_kinds for p in nonempty]),
        )


def _concat_optional(parts: list) -> Optional[np.ndarray]:
    """A column every part has, joined; None when some part lacks it (e.g. a shard embedded without text)."""
    return None if any(p is None for p in parts) else np.concatenate(parts)


def join_labels(
    shard: str,
    keys,
    statuses,
    ok_embeddings: np.ndarray,
    samples: list[TarSample],
    label_field: str,
    image_extensions,
    pixel_spec: Optional[PreprocessSpec] = None,
    draft: bool = True,
    max_pixels: int = 89_478_485,
    ok_scores: Optional[np.ndarray] = None,
    with_captions: bool = False,
) -> LabeledSet:
    """One shard's embeddings (all rows, `ok_embeddings` for the ok ones; `ok_scores`: their clip
    scores, when the shard was embedded with text) + its tar's samples (`with_captions`: their .txt).

    A sample is used when its embedding is ok and finite, its `.json` member holds an integer
    label and (with `pixel_spec`) its image decodes; every other one is counted by reason.
    """
    statuses = np.asarray(statuses, dtype=object)
    ok_rows = np.nonzero(statuses == schema.STATUS_OK)[0]
    excluded = Counter(str(s) for s in statuses[statuses != schema.STATUS_OK])
    by_key = {s.key: s for s in samples if s.status == schema.STATUS_OK}
    use_keys, use_labels, use_rows, use_pixels, use_kinds, use_captions, use_caption_kinds = [], [], [], [], [], [], []
    for vec_index, row in enumerate(ok_rows):
        key = str(keys[row])
        sample = by_key.get(key)
        if sample is None:
            excluded[EXCLUDED_NOT_IN_TAR] += 1
            continue
        if not np.isfinite(ok_embeddings[vec_index]).all():
            excluded[schema.STATUS_BAD_EMBEDDING] += 1
            continue
        found = sample.member((LABEL_MEMBER,))
        label, why = parse_label(found[1] if found else None, label_field)
        if why:
            excluded[why] += 1
            continue
        if pixel_spec is not None:
            image = sample.member(image_extensions)
            arr, status = decode_image(image[1] if image else b"", pixel_spec, draft, max_pixels)
            if arr is None:
                excluded[status] += 1
                continue
            use_pixels.append(arr)
        use_keys.append(key)
        use_kinds.append(parse_kind(found[1] if found else None))
        use_caption_kinds.append(parse_kind(found[1] if found else None, CAPTION_KIND_FIELD, None))
        if with_captions:
            text = sample.member((schema.CAPTION_MEMBER,))
            use_captions.append(text[1].decode("utf-8", "replace").strip() if text else "")
        use_labels.append(label)
        use_rows.append(vec_index)
    dim = ok_embeddings.shape[1]
    pixels = None
    if pixel_spec is not None:
        size = pixel_spec.size
        pixels = np.stack(use_pixels) if use_pixels else np.zeros((0, size, size, 3), np.uint8)
    return LabeledSet(
        np.full(len(use_keys), shard, dtype=object), np.array(use_keys, dtype=object),
        np.array(use_labels, dtype=np.int64),
        l2_normalize(ok_embeddings[use_rows]) if use_rows else np.zeros((0, dim), np.float32),
        pixels, excluded, kinds=np.array(use_kinds, dtype=object),
        clip_scores=None if ok_scores is None else np.asarray(ok_scores, np.float32)[use_rows],
        captions=np.array(use_captions, dtype=object) if with_captions else None,
        caption_kinds=np.array(use_caption_kinds, dtype=object),
    )


def class_indices(*label_arrays: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Labels as they are (any integers >= 0) -> (the distinct labels, each array as indices 0..C-1),
    so the classifiers' heads have one output per label that occurs, however labels are numbered."""
    every = np.concatenate(label_arrays)
    classes = np.unique(every[every != JUNK_LABEL])  # junk has no class: it stays -1
    return classes, [np.where(a == JUNK_LABEL, -1, np.searchsorted(classes, a)).astype(np.int64) for a in label_arrays]


def label_counts(labels: np.ndarray) -> dict[str, int]:
    values, counts = np.unique(labels, return_counts=True)
    return {str(v): int(c) for v, c in zip(values, counts)}


def draw_pool(n_available: int, pool_size: Optional[int], seed: int) -> np.ndarray:
    """Sorted indices of the pool: everything, or a seeded random subset of `pool_size`."""
    if pool_size is None or pool_size >= n_available:
        if pool_size is not None and pool_size > n_available:
            raise ValueError(f"evaluate.pool_size={pool_size} but only {n_available} labeled train samples are usable")
        return np.arange(n_available)
    return np.sort(np.random.default_rng(seed).choice(n_available, size=pool_size, replace=False))
