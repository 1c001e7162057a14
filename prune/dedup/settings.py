"""Settings of semantic deduplication: the `dedup` section of a config."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from prune.settings import PLACEMENT, Section

KEEP_FARTHEST, KEEP_NEAREST, KEEP_RANDOM = "farthest", "nearest", "random"


class DedupConfig(Section):
    """SemDeDup (Abbas et al. 2023): of every group closer than `eps` inside a cluster, keep one."""

    eps: float = Field(0.05, gt=0.0, lt=1.0)  # duplicates: cosine similarity > 1 - eps
    # which member of a group survives: the one farthest from the prototype (the paper's default),
    # the nearest, or a seeded random one
    keep: Literal["farthest", "nearest", "random"] = KEEP_FARTHEST
    seed: int = 0  # keep: random's order
    bucket_rows: Annotated[int, PLACEMENT] = Field(1_000_000, ge=1)  # ok samples per dedup task (whole clusters per bucket)
    shards_per_task: Annotated[int, PLACEMENT] = Field(16, ge=1)  # shards one partition task reads
    # similarity rows computed at once: memory ~ cluster size x this; smaller blocks skip more of
    # the triangle no one reads (512: the fastest on 2,000-member clusters)
    block_rows: Annotated[int, PLACEMENT] = Field(512, ge=1)
