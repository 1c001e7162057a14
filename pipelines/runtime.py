"""Ray connection and the small task runner the stages share.

`connect` joins the cluster a job was submitted to (RAY_ADDRESS, or a running one) and only
starts a local Ray when there is none. `run_tasks` keeps a bounded number of per-shard tasks
in flight and yields results as they finish, so the driver's memory does not grow with the
number of shards.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from typing import Callable, Iterable, Iterator

import ray

from prune.config import RayConfig


def connect(cfg: RayConfig) -> str:
    """Connect to Ray; returns how ("address:<addr>", "existing" or "local").

    An explicit `ray.address`, or RAY_ADDRESS (set by `ray job submit`), joins that cluster;
    then a `ray start` cluster on this machine whose head answers; otherwise a new local Ray
    starts. The address file a dead cluster left behind is never followed (Ray would wait on it).
    """
    if ray.is_initialized():
        return "existing"
    if cfg.address or os.environ.get("RAY_ADDRESS"):
        address = cfg.address or os.environ["RAY_ADDRESS"]
        ray.init(address=address, configure_logging=False)
        return f"address:{address}"
    running = live_local_cluster()
    if running:
        ray.init(address=running, configure_logging=False)
        return f"existing:{running}"
    extra = {}
    if cfg.num_cpus:
        extra["num_cpus"] = cfg.num_cpus
    if cfg.object_store_memory:
        extra["object_store_memory"] = cfg.object_store_memory
    ray.init(address="local", include_dashboard=False, configure_logging=False, **extra)
    return "local"


def live_local_cluster(timeout_s: float = 1.0) -> str | None:
    """The GCS address of a `ray start` cluster on this machine, if its head accepts connections."""
    try:
        from ray._private.utils import read_ray_address

        address = read_ray_address()
        if not address:
            return None
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return address
    except (OSError, ValueError, ImportError):
        return None


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def run_tasks(
    fn: Callable, items: Iterable, *, max_in_flight: int | None = None, desc: str = "", **remote_args
) -> Iterator:
    """Run `fn(item)` as Ray tasks, at most `max_in_flight` at once; yield results in order done.

    A task lost with its worker or node is run again (Ray's system-failure retries, made explicit
    here), possibly after a partial first attempt: every `fn` must be idempotent, writing its
    outputs under a temporary name and renaming, or skipping what an earlier attempt finished.
    """
    from ray.experimental import tqdm_ray

    items = list(items)
    remote = ray.remote(**({"num_cpus": 1, "max_retries": 3} | remote_args))(fn)
    limit = max_in_flight or max(2, int(ray.cluster_resources().get("CPU", 2)) * 2)
    bar = tqdm_ray.tqdm(total=len(items), desc=desc) if desc else None
    pending: deque = deque()
    queue = deque(items)
    try:
        while queue or pending:
            while queue and len(pending) < limit:
                pending.append(remote.remote(queue.popleft()))
            done, rest = ray.wait(list(pending), num_returns=1)
            pending = deque(rest)
            if bar:
                bar.update(1)
            yield ray.get(done[0])
    finally:
        if bar:
            bar.close()


def resolve(value):
    """An ObjectRef handed inside a task argument (shared, put once) -> its value."""
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value
