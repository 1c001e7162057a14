"""Export stage: the kept set as ids, after select, for users who need ids rather than tars.

A shard stage (the executor's per-shard part runs it: skipping, batching, retries, progress): per
input shard it joins the kept rows of its scores with the img2dataset parquet beside the tar and
writes `export/ids/NNNNN.parquet` (key, shard, `export.id_col`, url and caption when present,
distance, cluster, band, and clip_score when the embeddings have it), stamped with this stage's
fingerprint. With `export.formats` naming `datacomp`, a last pass of tasks parses each shard's
uids into DataComp's pairs and the driver gathers them into the subset file
(`export/datacomp_subset.npy`: sorted `u8,u8` pairs, its resharder's `--subset-file`): the driver
only concatenates and sorts.

A shard whose parquet lacks the id column is recorded with the reason in the stage's stats (the
manifest) and in `export/_failed/NNNNN.json` (no ids file, so `export/ids` reads as one dataset),
never fatal; a first shard without the column is a config
error before any task starts, since then every shard would fail alike. Uids that are not 128-bit
hex are left out of the subset file and counted.
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
from prune.io.tables import file_footer, npy_bytes, read_scores, shard_metadata
from prune.settings import ConfigError

from ..pending import mark_done, marked_stats
from ..runtime import run_batched
from ..shard_stage import ShardJob, ShardStage, ShardStats
from ..stage import STAGES, Context


@dataclass
class ExportStats:
    kept: int = 0  # rows in export/
    shards: int = 0
    shard_failures: dict = field(default_factory=dict)  # shard -> why it has no export file
    datacomp_uids: Optional[int] = None  # rows of the subset file, when written
    invalid_uids: int = 0  # kept samples whose id is not a 128-bit hex uid (not in the subset file)


def with_clip_scores(out: OutputDir, shard: str, table: pa.Table) -> pa.Table:
    """The kept ids with each pair's clip score, when the embeddings have them (embed.text)."""
    with out.open(schema.EMBEDDINGS_DIR, schema.shard_file(shard)) as f:
        pf = pq.ParquetFile(f)
        if schema.CLIP_SCORE not in pf.schema_arrow.names:
            return table
        scores = pf.read(columns=[schema.KEY, schema.CLIP_SCORE])
    return table.join(scores, schema.KEY, join_type="left outer").sort_by(schema.KEY)


@dataclass(frozen=True)
class UidTask:
    out: OutputDir
    shard: str
    id_col: str


def shard_uids(task: UidTask) -> tuple[np.ndarray, int]:
    """One shard's exported uids as DataComp pairs (parsed here, in a task); -> (pairs, invalid)."""
    with task.out.open(schema.EXPORT_IDS_DIR, schema.shard_file(task.shard)) as f:
        ids = pq.ParquetFile(f).read(columns=[task.id_col]).column(0).to_pylist()
    pairs, bad = uid_pairs(ids)
    return pairs, len(bad)


FAILED_DIR = f"{schema.EXPORT_DIR}/_failed"  # per shard that has no ids file: why, and for which fingerprint


def _failure(out: OutputDir, shard: str) -> dict:
    name = f"{shard}.json"
    return out.read_json(FAILED_DIR, name) if out.exists(FAILED_DIR, name) else {}


def exported(fp: str, out: OutputDir, shard: str) -> bool:
    """Done with this fingerprint: its ids file is stamped with it, or its failure is recorded for it."""
    meta, _ = file_footer(out, schema.EXPORT_IDS_DIR, shard)
    return meta.get(schema.META_EXPORT_FINGERPRINT, b"").decode() == fp or _failure(out, shard).get("fingerprint") == fp


@STAGES.register
@dataclass
class ExportStage(ShardStage):
    name = "export"
    reads = ("select",)  # the scores' keep column: a change of export settings re-runs the export alone
    output_dir = schema.EXPORT_IDS_DIR
    stamp_key = schema.META_EXPORT_FINGERPRINT

    export: ExportConfig = field(default_factory=ExportConfig)

    def process_shard(self, job: ShardJob) -> dict:
        """One shard's kept ids -> export/ids/NNNNN.parquet (empty, with the reason, when it cannot)."""
        scores = read_scores(job.out, job.shard,
                             columns=[schema.KEY, schema.KEEP, schema.DISTANCE, schema.CLUSTER, schema.BAND])
        metadata = shard_metadata(job.out, job.shard, job.url)
        error = missing_id_col(job.shard, metadata, self.export.id_col)
        if error:
            job.out.remove(schema.EXPORT_IDS_DIR, schema.shard_file(job.shard))
            job.out.write_json({"fingerprint": job.fingerprint, "error": error}, FAILED_DIR, f"{job.shard}.json")
            return {"error": error}
        table = with_clip_scores(job.out, job.shard, kept_ids(job.shard, scores, metadata, self.export))
        self.write_shard(job, table)
        job.out.remove(FAILED_DIR, f"{job.shard}.json")
        return {"kept": len(table)}

    def done_check(self, ctx: Context):
        return functools.partial(exported, ctx.fingerprint)

    def shard_counts(self, out: OutputDir, shard: str) -> dict:
        failure = _failure(out, shard)
        if failure:
            return {"error": failure["error"]}
        return {"kept": file_footer(out, schema.EXPORT_IDS_DIR, shard)[1]}

    def summarize(self, computed: dict, reused: dict) -> ExportStats:
        failures = {s: c["error"] for s, c in (*computed.items(), *reused.items()) if "error" in c}
        kept = ShardStats.of({s: c for s, c in computed.items() if "error" not in c},
                             {s: c for s, c in reused.items() if "error" not in c}).totals.get("kept", 0)
        return ExportStats(kept=kept, shards=len(computed) + len(reused), shard_failures=dict(sorted(failures.items())))

    def complete(self, ctx: Context) -> Optional[ExportStats]:
        recorded = marked_stats(ctx.out, schema.EXPORT_DIR, ctx.fingerprint)  # the subset file too, when asked
        return ExportStats(**recorded) if recorded is not None and super().complete(ctx) is not None else None

    def run(self, ctx: Context) -> ExportStats:
        out, shards = ctx.out, sorted(ctx.shards)
        if self.export.id_col != schema.KEY and shards:
            error = missing_id_col(shards[0], shard_metadata(out, shards[0], ctx.shards[shards[0]]), self.export.id_col)
            if error:
                raise ConfigError(error)
        for name in out.listdir(schema.EXPORT_IDS_DIR):  # another input's shards must not mix with these
            if name.removesuffix(".parquet") not in ctx.shards:
                out.remove(schema.EXPORT_IDS_DIR, name)
        stats = super().run(ctx)
        if FORMAT_DATACOMP in self.export.formats:
            self.write_subset(ctx, stats)
        mark_done(out, schema.EXPORT_DIR, ctx.fingerprint, stats.__dict__)
        return stats

    def write_subset(self, ctx: Context, stats: ExportStats) -> None:
        """DataComp's subset file from every exported shard's uids, parsed in tasks."""
        if stats.kept > self.export.max_datacomp_rows:
            raise ConfigError(f"export.max_datacomp_rows: {stats.kept} kept uids, more than "
                              f"{self.export.max_datacomp_rows} (16 bytes each in one process)")
        tasks = [UidTask(ctx.out, s, self.export.id_col) for s in sorted(ctx.shards) if s not in stats.shard_failures]
        parts = []
        for pairs, bad in run_batched(shard_uids, tasks, desc="export: datacomp uids"):
            parts.append(pairs)
            stats.invalid_uids += bad
        uids = subset_file(parts)
        stats.datacomp_uids = len(uids)
        with ctx.out.open_atomic(schema.EXPORT_DIR, DATACOMP_FILE) as f:
            f.write(npy_bytes(uids))
