"""Export stage: the kept set as ids, after select, for users who need ids rather than tars.

Per input shard a task joins the kept rows of its scores with the img2dataset parquet beside the
tar and writes `export/ids/NNNNN.parquet` (key, shard, `export.id_col`, url and caption when present,
distance, cluster, band), stamped with this stage's fingerprint. With `export.formats` naming
`datacomp`, the driver then gathers the uids into DataComp's subset file
(`export/datacomp_subset.npy`: sorted `u8,u8` pairs, its resharder's `--subset-file`).

The uids are parsed in the tasks (staged as .npy); the driver only concatenates and sorts them.
A shard whose parquet lacks the id column, or whose ids are not 128-bit hex, is recorded with the
reason in the stage's stats (the manifest), never fatal; a first shard without the column is a
config error before any task starts, since then every shard would fail alike.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prune import schema
from prune.io.exports import (
    DATACOMP_FILE,
    FORMAT_DATACOMP,
    ExportConfig,
    kept_ids,
    missing_id_col,
    subset_file,
    uid_pairs,
)
from prune.io.storage import OutputDir
from prune.io.tables import npy_bytes, read_scores, shard_metadata
from prune.settings import ConfigError

from ..pending import mark_done, marked_stats, pending, stamped
from ..runtime import run_tasks
from ..stage import STAGES, Context, Stage


@dataclass
class ExportStats:
    kept: int = 0  # rows in export/
    shards: int = 0
    shard_failures: dict = field(default_factory=dict)  # shard -> why it has no export file
    datacomp_uids: Optional[int] = None  # rows of the subset file, when written
    invalid_uids: int = 0  # kept samples whose id is not a 128-bit hex uid (not in the subset file)


@dataclass(frozen=True)
class ExportTask:
    out: OutputDir
    shard: str
    url: str
    settings: ExportConfig
    fp: str
    staging: str  # where the task leaves its uids as DataComp pairs (.npy) when that format is asked


def with_clip_scores(out: OutputDir, shard: str, table: pa.Table) -> pa.Table:
    """The kept ids with each pair's clip score, when the embeddings have them (embed.text)."""
    with out.open(schema.EMBEDDINGS_DIR, schema.shard_file(shard)) as f:
        pf = pq.ParquetFile(f)
        if schema.CLIP_SCORE not in pf.schema_arrow.names:
            return table
        scores = pf.read(columns=[schema.KEY, schema.CLIP_SCORE])
    return table.join(scores, schema.KEY, join_type="left outer").sort_by(schema.KEY)


def export_shard(task: ExportTask) -> dict:
    """One shard's kept ids -> export/ids/NNNNN.parquet; -> {shard, kept} or {shard, error}."""
    scores = read_scores(task.out, task.shard,
                         columns=[schema.KEY, schema.KEEP, schema.DISTANCE, schema.CLUSTER, schema.BAND])
    metadata = shard_metadata(task.out, task.shard, task.url)
    error = missing_id_col(task.shard, metadata, task.settings.id_col)
    if error:
        return {"shard": task.shard, "error": error}
    table = kept_ids(task.shard, scores, metadata, task.settings)
    table = with_clip_scores(task.out, task.shard, table)
    with task.out.open_atomic(schema.EXPORT_IDS_DIR, schema.shard_file(task.shard)) as f:
        pq.write_table(table.replace_schema_metadata({schema.META_EXPORT_FINGERPRINT: task.fp.encode()}), f)
    record = {"shard": task.shard, "kept": len(table)}
    if FORMAT_DATACOMP in task.settings.formats:  # parsed here, in the task: the driver only concatenates
        pairs, bad = uid_pairs(table.column(task.settings.id_col).to_pylist())
        task.out.write_bytes(npy_bytes(pairs), task.staging, f"{task.shard}.npy")
        record["invalid_uids"] = len(bad)
    return record


@STAGES.register
@dataclass
class ExportStage(Stage):
    name = "export"
    reads = ("select",)  # the scores' keep column: a change of export settings re-runs the export alone

    export: ExportConfig = field(default_factory=ExportConfig)

    def _datacomp(self) -> bool:
        return FORMAT_DATACOMP in self.export.formats

    def complete(self, ctx: Context) -> Optional[ExportStats]:
        recorded = marked_stats(ctx.out, schema.EXPORT_DIR, ctx.fingerprint)
        if recorded is None:
            return None
        stats = ExportStats(**recorded)
        exported = [s for s in ctx.shards if s not in stats.shard_failures]
        if pending(ctx.out, exported, functools.partial(stamped, schema.EXPORT_IDS_DIR, schema.META_EXPORT_FINGERPRINT,
                                                        ctx.fingerprint)):
            return None
        return stats

    def run(self, ctx: Context) -> ExportStats:
        out, fp, shards = ctx.out, ctx.fingerprint, sorted(ctx.shards)
        if self.export.id_col != schema.KEY and shards:
            error = missing_id_col(shards[0], shard_metadata(out, shards[0], ctx.shards[shards[0]]), self.export.id_col)
            if error:
                raise ConfigError(error)
        out.remove(schema.EXPORT_DIR)  # another selection's ids must not mix with these (cheap to redo)
        staging = f"{schema.STAGING_DIR}/export-{fp}"
        stats = ExportStats(shards=len(shards))
        tasks = [ExportTask(out, s, ctx.shards[s], self.export, fp, staging) for s in shards]
        for rec in run_tasks(export_shard, tasks, desc="export: kept ids"):
            if "error" in rec:
                stats.shard_failures[rec["shard"]] = rec["error"]
            else:
                stats.kept += rec["kept"]
                stats.invalid_uids += rec.get("invalid_uids", 0)
        if self._datacomp():
            if stats.kept > self.export.max_datacomp_rows:
                raise ConfigError(f"export.max_datacomp_rows: {stats.kept} kept uids, more than "
                                  f"{self.export.max_datacomp_rows} (16 bytes each in one process)")
            parts = []
            for s in shards:
                if s not in stats.shard_failures:
                    with out.open(staging, f"{s}.npy") as f:
                        parts.append(np.load(f))
            uids = subset_file(parts)
            stats.datacomp_uids = len(uids)
            with out.open_atomic(schema.EXPORT_DIR, DATACOMP_FILE) as f:
                f.write(npy_bytes(uids))
            out.remove(staging)
        mark_done(out, schema.EXPORT_DIR, fp, stats.__dict__)
        return stats
