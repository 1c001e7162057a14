"""Write stage: pruned shards in distance bands, with img2dataset metadata beside them.

Per input shard a task streams the tar once and sends kept samples to their band's
fragment; the driver plans output shards from the fragment counts alone; per output shard
a task concatenates its fragment slices. `sizes.json` and `bands.json` come last, then the
stage marker, so a set with a marker is complete.

Ray retries a task whose node was lost. Every file here is written whole under its final name
(OutputDir.open_atomic: rename locally, one completed upload on S3), and the outputs are pure
functions of the selection: a retried fragment task finds its `done/` record and returns it, or
rewrites its fragments byte for byte; a retried output task finds its tar (written last) or
rewrites the shard identically. No sample is lost or written twice.
"""

from __future__ import annotations

import pyarrow.parquet as pq

from prune import schema
from prune.config import RunConfig, fingerprint
from prune.storage import OutputDir
from prune.writer import plan_output_shards, write_fragments, write_output_shard

from .runtime import run_tasks
from .select_stage import select_fingerprint


def write_fingerprint(cfg: RunConfig, shards) -> str:
    return fingerprint("write", select_fingerprint(cfg, shards), cfg.write)


def fragment_task(item: dict) -> dict:
    """One input shard -> its band fragments; skipped if a previous attempt finished it."""
    out: OutputDir = item["out"]
    shard, staging = item["shard"], item["staging"]
    done_name = f"done/{shard}.json"
    if out.exists(staging, done_name):
        return out.read_json(staging, done_name)
    with out.open(schema.SCORES_DIR, f"{shard}.parquet") as f:
        table = pq.read_table(f, filters=[(schema.KEEP, "==", True)])
    kept = {row[schema.KEY]: row for row in table.select([schema.KEY, *schema.SCORE_COLUMNS_IN_PRUNED]).to_pylist()}
    result = write_fragments(item["url"], shard, kept, out, staging)
    record = {"shard": shard, "counts": {str(b): n for b, n in result.counts.items()}}
    if sum(result.counts.values()) != len(kept):
        raise RuntimeError(f"shard {shard}: {len(kept)} samples to keep, {sum(result.counts.values())} found in the tar")
    out.write_json(record, staging, done_name)
    return record


def output_task(item: dict) -> dict:
    out: OutputDir = item["out"]
    plan = item["plan"]
    if not out.exists(schema.PRUNED_DIR, plan.name):
        write_output_shard(out, item["staging"], schema.PRUNED_DIR, plan)
    return {"name": plan.name, "count": plan.count, "band": plan.band}


def run_write(cfg: RunConfig, out: OutputDir, shards: dict[str, str], edges: list[float], totals: dict) -> dict:
    fp = write_fingerprint(cfg, shards)
    marker = f"{schema.PRUNED_DIR}/{schema.STAGE_MARKER}"
    if out.exists(marker) and out.read_json(marker).get("fingerprint") == fp:
        return out.read_json(schema.PRUNED_DIR, schema.BANDS_FILE) | {"reused": True}
    staging = f"{schema.STAGING_DIR}/write-{fp}"
    pending = f"{schema.PRUNED_DIR}/{schema.PENDING_MARKER}"
    if not (out.exists(pending) and out.read_json(pending).get("fingerprint") == fp):
        # shards of another selection must not mix with these: start the set afresh
        for name in out.listdir(schema.PRUNED_DIR):
            out.remove(schema.PRUNED_DIR, name)
        out.write_json({"fingerprint": fp}, pending)
    # else: an interrupted write of this very selection; its finished shards are kept
    counts: dict[tuple[int, str], int] = {}
    items = [{"out": out, "shard": s, "url": shards[s], "staging": staging} for s in sorted(shards)]
    for rec in run_tasks(fragment_task, items, desc="write: fragments"):
        for band, n in rec["counts"].items():
            counts[(int(band), rec["shard"])] = n
    plans = plan_output_shards(counts, cfg.write.samples_per_shard)
    written = sorted(
        run_tasks(output_task, [{"out": out, "plan": p, "staging": staging} for p in plans], desc="write: shards"),
        key=lambda r: r["name"],
    )
    sizes = {r["name"]: r["count"] for r in written}
    out.write_json(sizes, schema.PRUNED_DIR, schema.SIZES_FILE)
    n_input_ok = totals["kept"] + totals["pruned"]
    bands, cumulative = [], 0
    for b, edge in enumerate(edges):
        names = [r["name"] for r in written if r["band"] == b]
        n = sum(sizes[x] for x in names)
        cumulative += n
        bands.append({
            "band": b,
            "keep_fraction": edge,
            "shards": names,
            "samples": n,
            "cumulative_samples": cumulative,
            "cumulative_fraction_of_ok": cumulative / n_input_ok if n_input_ok else 0.0,
            "prefix": f"{{{written[0]['name'][:-4]}..{names[-1][:-4]}}}.tar" if names else None,
        })
    doc = {"policy": cfg.select.policy, "balanced": cfg.select.balanced, "keep_fraction": cfg.select.keep_fraction, "bands": bands}
    out.write_json(doc, schema.PRUNED_DIR, schema.BANDS_FILE)
    out.remove(staging)
    out.write_json({"fingerprint": fp}, marker)
    out.remove(pending)
    return doc | {"reused": False}
