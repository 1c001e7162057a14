"""Settings of the pruned shard sets: the `write` section of a config."""

from __future__ import annotations

from pydantic import Field

from prune.settings import Section


class WriteConfig(Section):
    samples_per_shard: int = Field(1000, ge=1)
    band_step: float = Field(0.1, gt=0.0, le=1.0)  # pruned shards come in bands of this keep fraction
