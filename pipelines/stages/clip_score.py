"""Clip score stage: caption-image agreement, a curation stage (DataComp's CLIP score filtering).

It reads the clip score the embed stage recorded with `embed.text` (the cosine of each pair's
caption and image embeddings, in the same actor pass) and removes, among the samples the curation
stages before it left, the pairs that agree least: below `clip_score.min_score`, or outside the
best-agreeing `clip_score.keep_top_fraction` (its exact cut comes from two histogram passes in
tasks, prune/align/cut.py), each as `low_alignment`; a sample without a caption is kept, or removed
as `no_caption` with `clip_score.missing=remove`. A shard stage: `removals/clip_score/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa

from prune import schema
from prune.align import cut
from prune.align.settings import ClipScoreConfig
from prune.io.storage import OutputDir
from prune.io.tables import counts_by_reason, read_embeddings, read_removals, surviving
from prune.select import cuts
from prune.settings import ConfigError

from ..runtime import TASKS_PER_CPU, batches, map_reduce
from ..shard_stage import ShardJob, ShardStage, ShardStats
from ..stage import STAGES, Context


@dataclass
class ClipScoreStats(ShardStats):
    cut: Optional[float] = None  # the score the rule keeps from (the larger of min_score and the top fraction's)
    scored: int = 0  # samples with a score that the curation before this stage left


def scored_samples(out: OutputDir, shard: str, removals: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A shard's keys, whether each is still a candidate (ok, not removed before), and its clip score
    (NaN: no caption)."""
    samples, status = surviving(out, shard, removals)
    keys = samples.column(schema.KEY).to_numpy(zero_copy_only=False)
    emb = read_embeddings(out, shard, [schema.CLIP_SCORE])  # rows in the assignment's order
    score = emb.column(schema.CLIP_SCORE).to_numpy(zero_copy_only=False).astype(np.float32)
    return keys, status == schema.STATUS_OK, score


@dataclass(frozen=True)
class CutPass:
    out: OutputDir
    shards: tuple
    removals: tuple
    high: Optional[int] = None  # None: the high-bits pass; else the low bits inside this high bin


def cut_histogram(task: CutPass) -> tuple[np.ndarray, np.ndarray]:
    """One task's shards -> the sparse histogram (bin, count) of their candidates' score keys."""
    total = np.zeros(cut.BINS, np.int64)
    for shard in task.shards:
        _, candidate, score = scored_samples(task.out, shard, task.removals)
        s = score[candidate & ~np.isnan(score)]
        total += cut.high_histogram(s) if task.high is None else cut.low_histogram(s, task.high)
    nz = np.nonzero(total)[0]
    return nz.astype(np.int64), total[nz]


def _dense(sparse: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    hist = np.zeros(cut.BINS, np.int64)
    cuts.add_sparse(hist, sparse)
    return hist


@STAGES.register
@dataclass
class ClipScoreStage(ShardStage):
    """Pairs whose caption agrees least with the image, removed as `low_alignment`."""

    name = "clip_score"
    reads = ("assign", "embed")  # the samples, and the clip score the embed stage recorded
    removes = True

    clip_score: ClipScoreConfig = field(default_factory=lambda: ClipScoreConfig(keep_top_fraction=0.3))
    _cut: Optional[float] = field(default=None, init=False, repr=False, compare=False)  # set by run(), read by the tasks

    def run(self, ctx: Context) -> ClipScoreStats:
        self.check_scores(ctx)
        self._cut = self.min_kept(ctx)
        stats = super().run(ctx)
        stats.cut = self._cut
        return stats

    def check_scores(self, ctx: Context) -> None:
        """The embeddings carry clip scores (embed.text, or imported caption embeddings): else one line."""
        import pyarrow.parquet as pq

        shard = min(ctx.shards)
        with ctx.out.open(schema.EMBEDDINGS_DIR, schema.shard_file(shard)) as f:
            names = pq.read_schema(f).names
        if schema.CLIP_SCORE not in names:
            raise ConfigError("the clip_score stage needs the captions' scores, and the embeddings have none: set "
                              "embed.text=true (a backend with a text tower, e.g. open_clip), import caption embeddings "
                              "with the image ones, or leave clip_score out of the stages")

    def min_kept(self, ctx: Context) -> Optional[float]:
        """The lowest score kept: min_score, raised to the top fraction's exact cut."""
        rule = self.clip_score
        floor = rule.min_score
        if rule.keep_top_fraction is None:
            return floor
        groups = [tuple(b) for b in batches(sorted(ctx.shards), TASKS_PER_CPU)]
        high = _dense(map_reduce(cut_histogram, [CutPass(ctx.out, g, ctx.removals) for g in groups], cuts.fold_sparse,
                                 desc="clip_score: score histogram"))
        n = int(high.sum())
        if n == 0:
            return floor
        keep = cut.keep_count(rule.keep_top_fraction, n)
        b, above = cut.nth_largest_bin(high, keep)
        low = _dense(map_reduce(cut_histogram, [CutPass(ctx.out, g, ctx.removals, b) for g in groups], cuts.fold_sparse,
                                desc="clip_score: cut bin"))
        lb, _ = cut.nth_largest_bin(low, keep - above)
        top = cut.key_value((b << 16) | lb)
        return top if floor is None else max(top, floor)

    def process_shard(self, job: ShardJob) -> dict:
        keys, candidate, score = scored_samples(job.out, job.shard, job.removals)
        reason = np.full(len(keys), None, dtype=object)
        if self._cut is not None:
            reason[candidate & (score < self._cut)] = schema.STATUS_LOW_ALIGNMENT  # NaN < cut is False
        if self.clip_score.missing == "remove":
            reason[candidate & np.isnan(score)] = schema.STATUS_NO_CAPTION
        gone = reason != None  # noqa: E711 (elementwise)
        self.write_shard(job, pa.table({schema.KEY: pa.array(keys[gone], pa.string()),
                                        schema.STATUS: pa.array(reason[gone], pa.string())}))
        counts = counts_by_reason(reason[gone])
        counts["scored"] = int((candidate & ~np.isnan(score)).sum())
        return counts

    def shard_counts(self, out: OutputDir, shard: str) -> dict:
        return counts_by_reason(read_removals(out, self.name, shard).column(schema.STATUS).to_numpy(zero_copy_only=False))

    def summarize(self, computed: dict, reused: dict) -> ClipScoreStats:
        base = ShardStats.of(computed, reused)
        scored = base.totals.pop("scored", 0)
        return ClipScoreStats(base.shards_computed, base.shards_reused, base.totals, self._cut, scored)


