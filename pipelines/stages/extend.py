"""The stages of `ssl-prune extend` that differ from a run's: they take from the parent run what a
run would compute over all of its data (Ray wiring; pipelines/extend.py builds the job).

- `ParentPrototypesStage` ("prototypes"): the parent's centroids, copied, not refitted;
- `ExtendSelectStage` ("select"): the parent's recorded thresholds (prune/select/record.py)
  applied to the new samples' priorities: a new sample gets the decision it would have got in the
  parent's run;
- `ExtendWriteStage` ("write"): the new kept samples as shards numbered after the parent's, and a
  `sizes.json` / `bands.json` that cover the parent's shards and these.

The other stages are the run's own, on the new shards (the dedup stage with `parents`, across the
boundary).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import ray

from prune import schema
from prune.io.storage import OutputDir
from prune.select import record
from prune.select.policies import policy_class
from prune.select.settings import SelectConfig

from ..stage import Context, Stage
from .prototypes import PrototypesStats
from .select import SelectStage, SelectStats, pass_apply
from .write import WriteStage


class ParentMismatch(ValueError):
    """The parent cannot be extended with these settings (another model, missing records)."""


@dataclass
class ParentPrototypesStage(Stage):
    """`prototypes/`: the parent's centroids and k-means record, with the parent named in it."""

    name = "prototypes"
    reads = ("embed",)

    parent: str = ""  # the parent run's output URL
    parent_fingerprint: str = ""  # the parent's prototypes fingerprint (its manifest's)

    def identity(self, ctx: Context) -> tuple:
        return ("parent", self.parent_fingerprint)

    def complete(self, ctx: Context) -> Optional[PrototypesStats]:
        out = ctx.out
        if not out.exists(schema.PROTOTYPES_DIR, schema.KMEANS_META_FILE):
            return None
        meta = out.read_json(schema.PROTOTYPES_DIR, schema.KMEANS_META_FILE)
        if meta.get("fingerprint") != ctx.fingerprint or not out.exists(schema.PROTOTYPES_DIR, schema.CENTROIDS_FILE):
            return None
        return PrototypesStats(meta["k"], meta["n_ok_total"], meta)

    def run(self, ctx: Context) -> PrototypesStats:
        parent = OutputDir(self.parent)
        with parent.open(schema.PROTOTYPES_DIR, schema.CENTROIDS_FILE) as f:
            ctx.out.write_bytes(f.read(), schema.PROTOTYPES_DIR, schema.CENTROIDS_FILE)
        meta = parent.read_json(schema.PROTOTYPES_DIR, schema.KMEANS_META_FILE)
        meta |= {"fingerprint": ctx.fingerprint, "parent": {"output": self.parent, "fingerprint": meta.get("fingerprint")}}
        ctx.out.write_json(meta, schema.PROTOTYPES_DIR, schema.KMEANS_META_FILE)  # last: present means complete
        return PrototypesStats(meta["k"], meta["n_ok_total"], meta)


@dataclass
class ExtendSelectStage(SelectStage):
    """`scores/` of the new samples, selected by the parent's thresholds; `selection/` again (so
    an extension of this extension selects alike)."""

    parent: str = ""

    def parent_record(self) -> record.SelectionRecord:
        rec = record.load(OutputDir(self.parent))
        if rec is None:
            raise ParentMismatch(f"{self.parent} has no {schema.SELECTION_DIR}/ (it was selected by an ssl-prune "
                                 "older than extend): run its select stage again with this version, then extend it")
        return rec

    def identity(self, ctx: Context) -> tuple:
        return ("parent", self.parent_record().meta["fingerprint"])

    def applied(self, rec: record.SelectionRecord) -> SelectConfig:
        """The parent's select settings as it applied them (what auto chose included)."""
        return SelectConfig(**rec.meta["select"])

    def complete(self, ctx: Context) -> Optional[SelectStats]:
        stats = super().complete(ctx)
        if stats is not None:
            stats.auto = self.parent_record().meta.get("auto")
        return stats

    def edges(self) -> list[float]:
        return self.parent_record().edges

    def run(self, ctx: Context) -> SelectStats:
        rec = self.parent_record()
        select = self.applied(rec)
        policy_class(select.policy)  # registered here too
        strata = None if rec.strata is None else ray.put(rec.strata)
        stats = SelectStats(rec.edges, auto=rec.meta.get("auto"))
        shared = ray.put((rec.cuts, rec.hist))
        for results in self.apply_tasks(ctx, shared, strata, select):
            for res in results:
                stats.add(res)
        record.save(ctx.out, rec.cuts, rec.hist, rec.strata,
                    rec.meta | {"fingerprint": ctx.fingerprint, "parent": {"output": self.parent,
                                                                           "fingerprint": rec.meta["fingerprint"]}})
        return stats

    def apply_tasks(self, ctx: Context, shared, strata, select: SelectConfig):
        from ..runtime import run_tasks

        return run_tasks(pass_apply, self.tasks(ctx, shared, strata, select), desc="select: apply (parent's cuts)")


@dataclass
class ExtendWriteStage(WriteStage):
    """The new kept samples as pruned shards numbered after the parent's; sizes.json and bands.json
    cover the parent's shards (by their URLs) and these."""

    parent: str = ""
    first_shard: int = 0  # the parent's shard count (its own parent's included): these start after it

    def identity(self, ctx: Context) -> tuple:
        return super().identity(ctx) + (("parent", self.parent, self.first_shard),)

    def first_output_shard(self) -> int:
        return self.first_shard

    def finish(self, out: OutputDir) -> None:
        combine_with_parent(out, OutputDir(self.parent))


def combine_with_parent(out: OutputDir, parent: OutputDir) -> None:
    """sizes.json: the parent's entries (its own parent's included) and this write's; bands.json:
    per band this write's shards and the parent's (`parent_shards`: their URLs, the parent's own
    parent's first), and the samples of both."""
    sizes = parent.read_json(schema.PRUNED_DIR, schema.SIZES_FILE) | out.read_json(schema.PRUNED_DIR, schema.SIZES_FILE)
    mine = out.read_json(schema.PRUNED_DIR, schema.BANDS_FILE)
    theirs = {b["band"]: b for b in parent.read_json(schema.PRUNED_DIR, schema.BANDS_FILE)["bands"]}
    cumulative = 0
    for b in mine["bands"]:
        p = theirs.get(b["band"], {})
        b["parent_shards"] = p.get("parent_shards", []) + [parent.url_of(schema.PRUNED_DIR, s) for s in p.get("shards", [])]
        b["samples_with_parent"] = b["samples"] + p.get("samples_with_parent", p.get("samples", 0))
        cumulative += b["samples_with_parent"]
        b["cumulative_samples_with_parent"] = cumulative
    mine["parent"] = parent.url
    out.write_json(sizes, schema.PRUNED_DIR, schema.SIZES_FILE)
    out.write_json(mine, schema.PRUNED_DIR, schema.BANDS_FILE)


