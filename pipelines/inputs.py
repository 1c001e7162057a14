"""The job's input shards, and the check that Ray workers reach the input and output storage."""

from __future__ import annotations

import ray

from prune import schema
from prune.io.storage import InputError, OutputDir, StoreError, list_input_shards, split_url

STORAGE_CHECK_TIMEOUT_S = 900  # long enough for an autoscaler to launch a first worker


def resolve_shards(spec: str) -> dict[str, str]:
    """shard id -> URL; two inputs with the same file name would collide in the outputs."""
    shards: dict[str, str] = {}
    for url in list_input_shards(spec):
        sid = schema.shard_id_of(url)
        if sid in shards:
            raise InputError(f"input: two shards share the name {sid}.tar ({shards[sid]}, {url})")
        shards[sid] = url
    return shards


def reach_storage(out: OutputDir, input_url: str) -> None:
    """On a worker: the output root (its bucket, on S3) and one input shard can be reached."""
    out.makedirs()
    fs, path = split_url(input_url)
    fs.info(path)


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
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise StoreError(
            f"no Ray worker checked the input and output storage within {STORAGE_CHECK_TIMEOUT_S} s: "
            "no worker node with a free CPU came up, or the storage endpoint does not answer"
        ) from None
    except ray.exceptions.RayTaskError as exc:
        raise StoreError(
            f"a Ray worker cannot reach the input {input_url} or the output {out.url}: {exc.cause!r}. "
            "Set the storage credentials and endpoint (e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
            "AWS_DEFAULT_REGION, AWS_ENDPOINT_URL) on every node, or give the nodes an instance role"
        ) from None
