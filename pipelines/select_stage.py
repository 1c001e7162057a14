"""Select stage: exact keep thresholds from per-shard histograms, then `keep`/`band` per sample.

Three light passes over `scores/`, each a set of per-shard tasks (see prune/selection.py):
histograms (summed on the driver), the priorities inside the cut bins, and the rewrite of
each scores file with priority, percentile, keep and band. The driver holds histograms and
cut-bin values only, never a column of every sample.

The rewrite replaces each scores file in one atomic write (a rename locally, one upload on
S3: readers see the old file or the new one) and stamps the select fingerprint; a retried
task finds the stamp and rewrites nothing, and its counts come from the same deterministic cuts.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from prune import schema, selection
from prune.config import RunConfig, fingerprint
from prune.storage import OutputDir

from .runtime import resolve, run_tasks
from .score_stage import kmeans_fingerprint

_COLS = [schema.KEY, schema.STATUS, schema.CLUSTER, schema.DISTANCE]


def select_fingerprint(cfg: RunConfig, shards) -> str:
    return fingerprint("select", kmeans_fingerprint(cfg, shards), cfg.select, cfg.write.band_step)


def _load(item: dict) -> tuple[pa.Table, np.ndarray, np.ndarray, np.ndarray]:
    """A scores table, its ok mask, and the ok rows' priorities and groups."""
    with item["out"].open(schema.SCORES_DIR, f"{item['shard']}.parquet") as f:
        table = pq.read_table(f)
    ok = table.column(schema.STATUS).to_numpy(zero_copy_only=False) == schema.STATUS_OK
    keys = table.column(schema.KEY).to_numpy(zero_copy_only=False)[ok]
    dist = table.column(schema.DISTANCE).to_numpy(zero_copy_only=False)[ok].astype(np.float64)
    sel = item["select"]
    prio = selection.priorities(sel["policy"], dist, item["shard"], list(keys), sel["seed"])
    groups = table.column(schema.CLUSTER).to_numpy()[ok].astype(np.int64) if sel["balanced"] else np.zeros(len(prio), np.int64)
    return table, ok, prio, groups


def pass_histogram(item: dict) -> tuple[np.ndarray, np.ndarray]:
    _, _, prio, groups = _load(item)
    return selection.sparse_histogram(prio, groups, item["spec"])


def pass_boundary(item: dict) -> dict:
    _, _, prio, groups = _load(item)
    return selection.boundary_values(prio, groups, resolve(item["plan"]))


def pass_apply(item: dict) -> dict:
    """Rewrite one scores file with its selection; return its counts for the manifest."""
    out: OutputDir = item["out"]
    table, ok, prio, groups = _load(item)
    cuts: selection.Cuts = resolve(item["cuts"])
    keep_ok, band_ok, pct_ok = cuts.apply(prio, groups, resolve(item["hist"]))
    n = len(table)
    prio_all = np.zeros(n, np.uint64)
    keep = np.zeros(n, bool)
    band = np.full(n, -1, np.int32)
    pct = np.full(n, np.nan)
    prio_all[ok], keep[ok], band[ok], pct[ok] = prio, keep_ok, band_ok, pct_ok
    meta = dict(table.schema.metadata or {})
    if meta.get(schema.META_SELECT_FINGERPRINT, b"").decode() != item["fp"]:
        meta[schema.META_SELECT_FINGERPRINT] = item["fp"].encode()
        new = table.set_column(table.schema.get_field_index(schema.PRIORITY), schema.PRIORITY, pa.array(prio_all, pa.uint64()))
        new = new.set_column(new.schema.get_field_index(schema.PERCENTILE), schema.PERCENTILE, pa.array(pct, pa.float64(), mask=~ok))
        new = new.set_column(new.schema.get_field_index(schema.KEEP), schema.KEEP, pa.array(keep))
        new = new.set_column(new.schema.get_field_index(schema.BAND), schema.BAND, pa.array(band, pa.int32()))
        with out.open_atomic(schema.SCORES_DIR, f"{item['shard']}.parquet") as f:
            pq.write_table(new.replace_schema_metadata(meta), f)
    statuses = table.column(schema.STATUS).to_numpy(zero_copy_only=False)
    return {
        "shard": item["shard"],
        "samples": n,
        "kept": int(keep.sum()),
        "pruned": int((ok & ~keep).sum()),
        "failed": dict(Counter(s for s in statuses if s != schema.STATUS_OK)),
        "bands": dict(Counter(int(b) for b in band[keep])),
        "shard_error": meta.get(schema.META_SHARD_ERROR, b"").decode() or None,
    }


def run_select(cfg: RunConfig, out: OutputDir, shards: dict[str, str], k: int) -> dict:
    fp = select_fingerprint(cfg, shards)
    sel = cfg.select.model_dump()
    spec = selection.HistogramSpec.for_groups(k if cfg.select.balanced else 1)
    edges = selection.band_edges(cfg.select.keep_fraction, cfg.write.band_step)
    base = [{"out": out, "shard": s, "select": sel} for s in sorted(shards)]

    hist = np.zeros((spec.n_groups, spec.bins), np.int64)
    for sparse in run_tasks(pass_histogram, [b | {"spec": spec} for b in base], desc="select: histograms"):
        selection.add_sparse(hist, sparse)
    plan = selection.plan_cuts(hist, spec, edges)
    plan_ref = ray.put(plan)
    values = selection.merge_boundary_values(
        run_tasks(pass_boundary, [b | {"plan": plan_ref} for b in base], desc="select: cut bins")
    )
    cuts = selection.finalize_cuts(plan, values)
    totals = {"samples": 0, "kept": 0, "pruned": 0, "failed": Counter(), "bands": Counter()}
    shard_failures = {}
    shared = {"cuts": ray.put(cuts), "hist": ray.put(hist), "fp": fp}  # shipped once, not per task
    for res in run_tasks(pass_apply, [b | shared for b in base], desc="select: apply"):
        for key in ("samples", "kept", "pruned"):
            totals[key] += res[key]
        totals["failed"].update(res["failed"])
        totals["bands"].update(res["bands"])
        if res["shard_error"]:
            shard_failures[res["shard"]] = res["shard_error"]
    return {
        "fingerprint": fp,
        "edges": edges,
        "samples": totals["samples"],
        "kept": totals["kept"],
        "pruned": totals["pruned"],
        "failed": dict(totals["failed"]),
        "kept_per_band": {int(b): n for b, n in sorted(totals["bands"].items())},
        "shard_failures": shard_failures,
    }
