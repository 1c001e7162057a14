"""The `run` job: a list of stages over the input shards, then the accounting and the manifest.

The manifest is removed first and written last, atomically: its presence means a complete run.
The same holds on object storage (s3://), where "atomically" means one completed upload (see
prune/io/storage.py); before any work on remote storage, a Ray worker checks that it reaches the
input and the output with its own credentials.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

from prune import schema
from prune.io.storage import OutputDir, is_local, split_url

from . import runtime
from .executor import Executed, execute, preflight, write_manifest
from .inputs import check_worker_storage, resolve_shards
from .lock import output_lock
from .report import ReportInAdvance, build_report
from .stage import Context, Stage

log = logging.getLogger("ssl_prune")


def counts_of(done: Executed, n_shards: int) -> dict:
    """The run's accounting, from the select stage's counts (and the write stage's, when it ran):
    input samples = kept + pruned + removed (by a curation stage, e.g. near-duplicates) + failed,
    and the pruned shards hold exactly the kept samples."""
    sel = done.stats.get("select")
    if sel is None:  # a run of the first stages only (e.g. embed and prototypes): nothing selected yet
        return {"input_shards": n_shards}
    counts = {
        "input_samples": sel.samples,
        "kept": sel.kept,
        "pruned": sel.pruned,
        "removed": sum(sel.removed.values()),
        "removed_by_reason": dict(sorted(sel.removed.items())),
        "failed": sum(sel.failed.values()),
        "failed_by_reason": dict(sorted(sel.failed.items())),
        "input_shards": n_shards,
        "shard_failures": sel.shard_failures,
    }
    if counts["input_samples"] != counts["kept"] + counts["pruned"] + counts["removed"] + counts["failed"]:
        raise AssertionError(f"accounting identity broken: {counts}")
    write = done.stats.get("write")
    if write is not None:
        counts["output_shards"] = write.output_shards
        if write.samples_written != counts["kept"]:
            raise AssertionError(f"accounting identity broken: {counts}, {write.samples_written} samples in pruned shards")
    return counts


def run_stages(
    stages: list[Stage], input_spec: Optional[str], output: str, ray_cfg: runtime.RayConfig, config: Optional[dict] = None,
    extra: Optional[dict] = None,
) -> dict:
    """Run every stage that is not complete; return the manifest (`config` and `extra`'s fields:
    recorded in it)."""
    t_start = time.time()
    preflight(stages)
    out = OutputDir(output)  # its store is reachable (an fsspec driver is installed) before anything runs
    # a first stage that brings its own units of work (import), unless the run names its input
    own = stages[0].input_shards() if not input_spec else None
    shards = own if own is not None else resolve_shards(input_spec)
    out.makedirs()
    with output_lock(out) as held:
        return _locked_run(stages, shards, out, output, ray_cfg, config, t_start, held.check, extra or {})


def _locked_run(stages, shards, out: OutputDir, output: str, ray_cfg, config, t_start: float,
                still_ours=lambda: None, extra: Optional[dict] = None) -> dict:
    out.remove(schema.MANIFEST)
    runtime.defer(ray_cfg)  # started by the first stage (or check) that needs it
    first = next(iter(shards.values()))
    if not (is_local(out.fs) and is_local(split_url(first)[0])):
        runtime.ensure()
        check_worker_storage(out, first)
    report = ReportInAdvance(out, config or {}, stages)  # its parts are prepared while the write stage runs
    def stage_done(label: str, stats: dict) -> None:
        still_ours()  # a driver that lost its lock stops before the next stage
        report.stage_done(label, stats)

    try:
        done = execute(stages, Context(out, shards), checked=True, on_stage_done=stage_done)
        still_ours()
        manifest = _manifest(stages, shards, out, done, config, t_start, extra or {})
    except BaseException:
        report.cancel()  # no thread of a failed run goes on reading its outputs
        raise
    if "select" in done.stats:  # a view of the finished run: a failure here loses nothing
        try:
            build_report(output, report.parts())
        except Exception:  # noqa: BLE001
            log.exception("report.html could not be written (the run itself is complete); "
                          "retry with: ssl-prune report %s", output)
    return manifest


def _manifest(stages, shards, out: OutputDir, done, config, t_start: float, extra: dict) -> dict:
    """The run's counts, bands and records in manifest.json; returns it."""
    counts = counts_of(done, len(shards))
    out.remove(schema.STAGING_DIR)
    # the stage that made the embeddings: embed, or one that provides its outputs (import)
    embed = next((s for s in stages if s.name == "embed" or "embed" in s.provides), None)
    fields = {"config": config or {}, "ray": runtime.connection(), "counts": counts, **extra}
    if embed is not None:
        fields |= {"model_id": embed.model_id, "embed_fingerprint": done.fingerprints[embed.label]}
        if embed.name == "embed":
            fields["random_init"] = not embed.embed.pretrained
    if "write" in done.stats:
        fields["bands"] = done.stats["write"].bands
    elif out.exists(schema.PRUNED_DIR):  # a scores-only run over an output an earlier run wrote shards to
        fields["stale_outputs"] = {schema.PRUNED_DIR: "written by an earlier run; this run's stages have no "
                                                      "'write', so its selection is only in scores/"}
    return write_manifest(out, done, time.time() - t_start, **fields)
