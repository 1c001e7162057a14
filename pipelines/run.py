"""`ssl-prune run`: the stages in order, each skipped when its outputs are complete.

A stage's outputs carry the fingerprint of the config that made them, so re-running the same
command resumes, and changing e.g. `select.keep_fraction` re-runs only select and write. The
manifest is removed first and written last, atomically: its presence means a complete run.
The same holds on object storage (s3://), where "atomically" means one completed upload
(see prune/storage.py); before any work on remote storage, a Ray worker checks that it
reaches the input and the output with its own credentials.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import time
from collections import Counter

import ray

from prune import schema
from prune.config import RunConfig
from prune.embedders import check_weights
from prune.storage import InputError, OutputDir, is_local, list_input_shards, split_url

from . import runtime
from .embed_stage import embed_fingerprint, model_id_for, run_embed
from .score_stage import run_assign, run_prototypes
from .select_stage import run_select
from .write_stage import run_write

log = logging.getLogger("ssl_prune")

_PACKAGES = ("ray", "torch", "open_clip_torch", "faiss-cpu", "pyarrow", "webdataset", "numpy", "pillow")


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def resolve_shards(spec: str) -> dict[str, str]:
    """shard id -> URL; two inputs with the same file name would collide in the outputs."""
    shards: dict[str, str] = {}
    for url in list_input_shards(spec):
        sid = schema.shard_id_of(url)
        if sid in shards:
            raise InputError(f"input: two shards share the name {sid}.tar ({shards[sid]}, {url})")
        shards[sid] = url
    return shards


def preflight(cfg: RunConfig) -> None:
    """Fail before any work on what the driver can check: the weights are on this machine."""
    check_weights(cfg.embed)


def reach_storage(out: OutputDir, input_url: str) -> None:
    """On a worker: the output root (its bucket, on S3) and one input shard can be reached."""
    out.makedirs()
    fs, path = split_url(input_url)
    fs.info(path)


STORAGE_CHECK_TIMEOUT_S = 900  # long enough for an autoscaler to launch a first worker


def check_worker_storage(out: OutputDir, input_url: str) -> None:
    """Fail early if Ray workers cannot reach the storage the driver can (credentials, endpoint).

    Workers do not see the driver's environment on a cluster: an instance role or AWS_*
    variables must be set on every node.
    """
    # one CPU: the task must run on a worker node (a cluster's head often has none to give),
    # which on an autoscaling cluster may first have to be launched
    ref = ray.remote(num_cpus=1, max_retries=0)(reach_storage).remote(out, input_url)
    try:
        ray.get(ref, timeout=STORAGE_CHECK_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError as exc:
        ray.cancel(ref, force=True)
        raise RuntimeError(
            f"no Ray worker checked the input and output storage within {STORAGE_CHECK_TIMEOUT_S} s: "
            "no worker node with a free CPU came up, or the storage endpoint does not answer"
        ) from exc
    except ray.exceptions.RayTaskError as exc:
        raise RuntimeError(
            f"a Ray worker cannot reach the input {input_url} or the output {out.url}: {exc.cause!r}. "
            "Set the storage credentials and endpoint (e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
            "AWS_DEFAULT_REGION, AWS_ENDPOINT_URL) on every node, or give the nodes an instance role"
        ) from exc.cause


def run(cfg: RunConfig) -> dict:
    """Run every stage that is not complete; return the manifest."""
    t_start = time.time()
    preflight(cfg)
    shards = resolve_shards(cfg.input)
    out = OutputDir(cfg.output)
    out.makedirs()
    out.remove(schema.MANIFEST)
    how = runtime.connect(cfg.ray)
    first = next(iter(shards.values()))
    if not (is_local(out.fs) and is_local(split_url(first)[0])):
        check_worker_storage(out, first)
    timings: dict[str, float] = {}

    def timed(name, fn, *args):
        t = time.time()
        result = fn(*args)
        timings[name] = round(time.time() - t, 3)
        log.info("stage %s done in %.1fs", name, timings[name])
        return result

    embed_stats = timed("embed", run_embed, cfg, out, shards)
    kmeans_meta = timed("prototypes", run_prototypes, cfg, out, shards)
    assign_stats = timed("assign", run_assign, cfg, out, shards)
    select_stats = timed("select", run_select, cfg, out, shards, kmeans_meta["k"])
    write_stats = timed("write", run_write, cfg, out, shards, select_stats["edges"], select_stats)

    failed = Counter(select_stats["failed"])
    counts = {
        "input_samples": select_stats["samples"],
        "kept": select_stats["kept"],
        "pruned": select_stats["pruned"],
        "failed": sum(failed.values()),
        "failed_by_reason": dict(sorted(failed.items())),
        "input_shards": len(shards),
        "shard_failures": select_stats["shard_failures"],
        "output_shards": sum(len(b["shards"]) for b in write_stats["bands"]),
    }
    written = sum(b["samples"] for b in write_stats["bands"])
    if counts["input_samples"] != counts["kept"] + counts["pruned"] + counts["failed"] or written != counts["kept"]:
        raise AssertionError(f"accounting identity broken: {counts}, {written} samples in pruned shards")
    out.remove(schema.STAGING_DIR)
    timings["total"] = round(time.time() - t_start, 3)
    manifest = {
        "tool": "ssl-prune",
        "config": cfg.model_dump(),
        "versions": package_versions(),
        "ray": how,
        "model_id": model_id_for(cfg.embed),
        "random_init": not cfg.embed.pretrained,
        "embed_fingerprint": embed_fingerprint(cfg),
        "counts": counts,
        "stages": {
            "embed": embed_stats,
            "prototypes": kmeans_meta,
            "assign": assign_stats,
            "select": {k: v for k, v in select_stats.items() if k not in ("failed", "shard_failures")},
            "write": {"reused": write_stats["reused"]},
        },
        "bands": write_stats["bands"],
        "timings_s": timings,
        "outputs": outputs_list(out),
    }
    out.write_json(manifest, schema.MANIFEST)
    return manifest


def outputs_list(out: OutputDir) -> list[str]:
    files = []
    for d in (schema.EMBEDDINGS_DIR, schema.PROTOTYPES_DIR, schema.SCORES_DIR, schema.PRUNED_DIR):
        files += [f"{d}/{n}" for n in out.listdir(d) if not n.startswith(".")]
    return files

