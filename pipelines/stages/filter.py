"""Filter stage: DataComp's basic filtering (image size and shape, caption length, a blocklist), a
curation stage over the img2dataset metadata beside each tar; it reads no image.

A shard stage: per shard, the samples that passed the curation stages before it and fail a rule
go to `removals/filter/NNNNN.parquet` with the rule as their reason. This file and its import in
pipelines/stages/__init__.py are all it takes (docs/extending.md, "Adding a stage").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from prune import schema
from prune.filter.rules import removal_reasons
from prune.filter.settings import FilterConfig
from prune.io.shards import sibling_metadata_or_error
from prune.io.storage import OutputDir
from prune.io.tables import counts_by_reason, imported_metadata, read_removals, surviving

from ..shard_stage import ShardJob, ShardStage
from ..stage import STAGES


@STAGES.register
@dataclass
class FilterStage(ShardStage):
    """Samples whose metadata fails a rule of the `filter` section, removed with that rule's reason."""

    name = "filter"
    reads = ("assign",)  # the samples (and their statuses) of each shard
    removes = True

    filter: FilterConfig = field(default_factory=FilterConfig)

    def process_shard(self, job: ShardJob) -> dict:
        samples, status = surviving(job.out, job.shard, job.removals)  # what the curation stages before it left
        keys = samples.column(schema.KEY).to_numpy(zero_copy_only=False)
        metadata, why = sibling_metadata_or_error(job.url)  # an I/O error that persists fails the task
        if metadata is None and not why:
            metadata = imported_metadata(job.out, job.shard)
        reason = np.full(len(keys), None, dtype=object)
        found = np.zeros(len(keys), bool)
        if metadata is not None and schema.KEY in metadata.column_names:
            at = pc.index_in(pa.array(keys, pa.string()), value_set=pc.cast(metadata.column(schema.KEY), pa.string()))
            found = at.is_valid().to_numpy(zero_copy_only=False)
            reason[found] = removal_reasons(metadata, self.filter)[at.fill_null(0).to_numpy(zero_copy_only=False)[found]]
        candidate = status == schema.STATUS_OK
        removed = candidate & (reason != None)  # noqa: E711 (elementwise)
        table = pa.table({schema.KEY: pa.array(keys[removed], pa.string()),
                          schema.STATUS: pa.array(reason[removed], pa.string())})
        self.write_shard(job, table)
        # what the rules could not look at: counted, so a run shows how much went unchecked
        return counts_by_reason(reason[removed]) | {"unchecked_no_metadata": int((candidate & ~found).sum()),
                                                    "shards_unreadable_metadata": int(bool(why))}

    def shard_counts(self, out: OutputDir, shard: str) -> dict:
        return counts_by_reason(read_removals(out, self.name, shard).column(schema.STATUS).to_numpy(zero_copy_only=False))


