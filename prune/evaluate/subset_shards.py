"""The shards a pretraining judge trains on: a kept subset's samples, every member copied byte for
byte from the pool's tars (as the write stage copies them), one tar per pool shard that keeps
something, and `sizes.json` (open_clip_train's sample counts) written last, so a directory that
has it is complete and a re-run finds it done."""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import numpy as np

from prune import schema
from prune.io.span_copy import copy_spans
from prune.io.storage import split_url
from prune.io.tar_spans import finish_archive, tar_index

SIZES_FILE = schema.SIZES_FILE


def read_sizes(target_dir: str) -> dict[str, int] | None:
    path = os.path.join(target_dir, SIZES_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_subset_shards(sources: Mapping[str, str], kept: Mapping[str, Sequence[str]], target_dir: str) -> dict[str, int]:
    """`kept`: pool shard -> the keys it keeps; `sources`: pool shard -> its tar's URL. Writes
    `target_dir/NNNNN.tar` (pool shards in sorted order, samples in tar order) and `sizes.json`
    -> {tar name: samples}. A key the tar no longer holds (or holds as a broken sample) is skipped
    and so not counted."""
    done = read_sizes(target_dir)
    if done is not None:
        return done
    os.makedirs(target_dir, exist_ok=True)
    sizes: dict[str, int] = {}
    for shard in sorted(s for s, keys in kept.items() if len(keys)):
        fs, path = split_url(sources[shard])
        with fs.open(path, "rb") as src:
            index = tar_index(src)
            row_of = {key: row for row, (key, ok) in enumerate(zip(index.keys, index.ok)) if ok}
            rows = np.array(sorted(row_of[str(k)] for k in kept[shard] if str(k) in row_of), np.int64)
            if not len(rows):
                continue
            _, offsets, lengths = index.spans(rows)
            name = schema.pruned_shard_name(len(sizes))
            final = os.path.join(target_dir, name)
            tmp = f"{final}.tmp-{os.getpid()}"
            with open(tmp, "wb") as dst:
                finish_archive(dst, copy_spans(src, dst, zip(offsets.tolist(), lengths.tolist())))
            os.replace(tmp, final)
            sizes[name] = int(len(rows))
    tmp = os.path.join(target_dir, f"{SIZES_FILE}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(sizes, f, indent=1)
    os.replace(tmp, os.path.join(target_dir, SIZES_FILE))
    return sizes
