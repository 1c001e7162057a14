"""Shards -> Ray Dataset of decoded uint8 crops: read tasks, then CPU decode tasks.

Shared by the embed stage and encoder training, so both see exactly the same crops. Decoding
never runs in the model actors: the model stage never waits for JPEG decoding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import ray

from prune import schema
from prune.embed.decode import PreprocessSpec, decode_batch
from prune.embed.settings import DecodeConfig
from prune.embed.text import MAX_CAPTION_CHARS, decode_caption
from prune.io.shards import read_shard, read_sibling_metadata
from prune.io.storage import OutputDir, split_url
from prune.io.tar_index_cache import record_index, tar_stamp

log = logging.getLogger("ssl_prune")

POS = "_pos"  # position of the sample in its tar (internal)
COUNT = "_count"  # samples in the shard (internal): a shard is complete when all arrived
SHARD_ERROR_KEY = ""  # the key of the one row that stands for a shard that could not be read


@dataclass(frozen=True)
class ShardInput:
    shard: str  # shard id
    url: str  # the input tar


def read_rows(item: dict, image_extensions: list[str], out: Optional[OutputDir] = None,
              caption_column: Optional[str] = None) -> list[dict]:
    """One tar ({shard, url} row) -> one row per sample (image bytes, or empty with the failure status).
    With `out`, where the tar's samples lie is recorded there too (the write stage's index). With
    `caption_column`, each row carries its caption (`captions_of`)."""
    shard = item["shard"]
    stamp = _stamp_or_none(item["url"]) if out is not None else None
    result = read_shard(item["url"], image_extensions)
    if stamp is not None and not result.shard_error:
        _record(out, shard, item["url"], stamp, result.samples)
    if result.shard_error:
        row = {schema.SHARD: shard, schema.KEY: SHARD_ERROR_KEY, POS: -1, COUNT: 0,
               schema.STATUS: f"{result.shard_error}: {result.detail}"[:500], schema.IMAGE: b""}
        return [row | ({schema.CAPTION: None} if caption_column is not None else {})]
    n = len(result.samples)
    rows = []
    for i, s in enumerate(result.samples):
        found = s.member(image_extensions) if s.status == schema.STATUS_OK else None
        rows.append({schema.SHARD: shard, schema.KEY: s.key, POS: i, COUNT: n,
                     schema.STATUS: s.status, schema.IMAGE: found[1] if found else b""})
    if caption_column is not None:
        for row, caption in zip(rows, captions_of(result.samples, item["url"], caption_column)):
            row[schema.CAPTION] = caption
    return rows


def captions_of(samples: list, url: str, column: str) -> list[Optional[str]]:
    """Each sample's caption: its .txt member (img2dataset writes one), else `column` of the parquet
    beside the tar (read only if some sample has no .txt); None where neither has one, or it is
    empty or not UTF-8 (the embed stage counts those)."""
    found = [decode_caption(member[1]) if (member := s.member((schema.CAPTION_MEMBER,))) else None for s in samples]
    if all(f is not None for f in found):
        return found
    metadata = read_sibling_metadata(url)
    if metadata is None or column not in metadata.column_names or schema.KEY not in metadata.column_names:
        return found
    by_key = dict(zip(metadata.column(schema.KEY).to_pylist(), metadata.column(column).to_pylist()))
    return [f if f is not None else _clean(by_key.get(s.key)) for f, s in zip(found, samples)]


def _clean(value) -> Optional[str]:
    if not isinstance(value, str):
        return None
    return value.strip()[:MAX_CAPTION_CHARS] or None


def _stamp_or_none(url: str) -> Optional[str]:
    try:
        return tar_stamp(*split_url(url))
    except Exception:  # noqa: BLE001 - the read itself reports what is wrong with the tar
        return None


def _record(out: OutputDir, shard: str, url: str, stamp: str, samples: list) -> None:
    """Save the tar's index; a failure only costs the write stage a walk over the headers."""
    try:
        record_index(out, shard, url, stamp, samples)
    except Exception:  # noqa: BLE001 - an optional shortcut must never fail the read of a shard
        log.warning("shard %s: its tar index was not recorded (the write stage will walk the tar)", shard, exc_info=True)


def decode_rows(batch: dict, spec: PreprocessSpec, draft: bool, max_pixels: int) -> dict:
    """CPU decode + geometric preprocessing of one batch (a stateless task, not an actor)."""
    pixels, status = decode_batch(list(batch[schema.IMAGE]), list(batch[schema.STATUS]), spec, draft, max_pixels)
    out = {k: v for k, v in batch.items() if k != schema.IMAGE}
    out[schema.STATUS] = np.array(status, dtype=object)
    out[schema.PIXELS] = pixels
    return out


def decode_memory_bytes(batch_size: int, spec: PreprocessSpec) -> int:
    """Memory to reserve for one decode task: input bytes, uint8 crops, PIL's working copies."""
    return int(batch_size * spec.size * spec.size * 3 * 8 + 128 * 2**20)


def decoded_dataset(
    shards: list[ShardInput], decode: DecodeConfig, image_extensions: list[str], spec: PreprocessSpec,
    index_out: Optional[OutputDir] = None, caption_column: Optional[str] = None,
) -> ray.data.Dataset:
    """Shards -> a Ray Dataset of rows with uint8 crops: read tasks, then CPU decode tasks.
    `index_out`: where the read tasks record each tar's index (`tar_index/`), if anywhere;
    `caption_column`: rows carry their captions (embed.text)."""
    items = [{"shard": s.shard, "url": s.url} for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.flat_map(read_rows, fn_args=(image_extensions, index_out, caption_column))
    return ds.map_batches(
        decode_rows, fn_args=(spec, decode.draft, decode.max_image_pixels),
        batch_size=decode.batch_size, num_cpus=decode.num_cpus,
        # the memory a batch of crops and its PIL intermediates needs; as a side effect these
        # args differ from the actors', so Ray Data never fuses decode into the model actors
        memory=decode_memory_bytes(decode.batch_size, spec),
    )
