"""Settings of the pruned shard sets: the `write` section of a config."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from prune.settings import PLACEMENT, Section

# where output shards read the kept bytes from: "input", ranges of the input tars (the kept bytes
# move once; right for local disks and shared file systems); "staged", fragment tars of the kept
# members written first (one sequential read per input tar; right for object storage, where small
# range reads are slow); "auto", by the input's storage
COPY_FROM_AUTO, COPY_FROM_INPUT, COPY_FROM_STAGED = "auto", "input", "staged"


class WriteConfig(Section):
    """The pruned shards: their size, their distance bands, where their bytes are read from."""

    samples_per_shard: int = Field(1000, ge=1)  # kept samples per output tar (a band's last shard may hold fewer)
    band_step: float = Field(0.1, gt=0.0, le=1.0)  # pruned shards come in bands of this keep fraction
    copy_from: Annotated[Literal["auto", "input", "staged"], PLACEMENT] = COPY_FROM_AUTO  # the same bytes either way
