"""Ray connection and the small task runner the stages share.

`connect` joins the cluster a job was submitted to (RAY_ADDRESS, or a running one) and only
starts a local Ray when there is none. `run_tasks` keeps a bounded number of per-shard tasks
in flight and yields results as they finish, so the driver's memory does not grow with the
number of shards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections import deque
from typing import Callable, Iterable, Iterator, Optional

import ray
from pydantic import Field

from prune.settings import Section

# Set to 1 (`ssl-prune --verbose` does) to let Ray's worker output reach this console. Off by
# default: task errors still reach the driver as exceptions; hidden is the workers' own chatter.
VERBOSE_ENV = "SSL_PRUNE_VERBOSE"


class RayConfig(Section):
    """The `ray` section: which cluster to join, or how to start a local one."""

    address: Optional[str] = None  # None: RAY_ADDRESS, then a running cluster, then a new local one
    num_cpus: Optional[int] = Field(None, ge=1)  # only for a new local cluster
    # bytes of Ray's object store, only for a new local cluster (None: Ray's default)
    object_store_memory: Optional[int] = Field(None, ge=78_643_200)


_QUICK_EXIT: list = []  # non-empty: the Ray this process starts or joins freezes its workers at exit
# Ray's own names (ray._private): the job's runtime_env as `ray job submit` passes it to the driver,
# and the variable a setup hook becomes in a runtime_env's env_vars
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
SETUP_HOOK_ENV = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"


def quick_exit_workers() -> None:
    """The CLI's choice, never the Python API's: the Ray workers and actors of the job `connect`
    starts next freeze their heap at exit, as the CLI's driver does (pipelines/quick_exit.py)."""
    _QUICK_EXIT[:] = [True]


def _job_runtime_env() -> dict:
    """The runtime_env `ray job submit` gave this job (Ray merges ray.init's into it), or {}."""
    try:
        return json.loads(os.environ.get(JOB_CONFIG_ENV, "{}")).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}


def worker_runtime_env(address: str | None = None) -> dict | None:
    """What `connect` adds to the job's runtime_env: the quick-exit setup hook, when the CLI asked
    for it, the job has no setup hook of its own (Ray refuses two) and `address` is no Ray Client
    one (it cannot ship a function). Otherwise None: those workers simply exit as usual."""
    from .quick_exit import worker_setup_hook

    job = _job_runtime_env()
    taken = ("worker_process_setup_hook" in job or SETUP_HOOK_ENV in (job.get("env_vars") or {})
             or SETUP_HOOK_ENV in os.environ)
    if not _QUICK_EXIT or taken or (address or "").startswith("ray://"):
        return None
    return {"worker_process_setup_hook": worker_setup_hook()}


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def quiet_ray_data() -> None:
    """Ray Data's INFO lines (execution plans, per-operator progress logs when stdout is not a
    terminal) and its issue detector's memory advice stay in Ray's session log files, off the
    console; its progress bars and warnings still show."""
    from ray.data import DataContext

    for handler in logging.getLogger("ray.data").handlers:
        if not getattr(handler, "baseFilename", None):  # the console handler; the file one keeps all
            handler.setLevel(logging.WARNING)
    DataContext.get_current().issue_detectors_config.detectors = []


def connect(cfg: RayConfig) -> str:
    """Connect to Ray; returns how ("address:<addr>", "existing" or "local").

    An explicit `ray.address`, or RAY_ADDRESS (set by `ray job submit`), joins that cluster;
    then a `ray start` cluster on this machine whose head answers; otherwise a new local Ray
    starts. The address file a dead cluster left behind is never followed (Ray would wait on it).
    Under the CLI the job's workers get the quick-exit hook (`worker_runtime_env`); a Ray this
    process had already initialised is used as it is.
    """
    if not verbose():
        quiet_ray_data()
    if ray.is_initialized():
        return "existing"
    common = {"configure_logging": False, "log_to_driver": verbose()}
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    hook = worker_runtime_env(address)
    if hook:  # merged by Ray with the runtime_env of a submitted job, never in place of it
        common["runtime_env"] = hook
    if address:
        ray.init(address=address, **common)
        if address == "local":
            _reap_with_this_process()
        return f"address:{address}"
    running = live_local_cluster()
    if running:
        ray.init(address=running, **common)
        return f"existing:{running}"
    extra = {}
    if cfg.num_cpus:
        extra["num_cpus"] = cfg.num_cpus
    if cfg.object_store_memory:
        extra["object_store_memory"] = cfg.object_store_memory
    ray.init(address="local", include_dashboard=False, **common, **extra)
    _reap_with_this_process()
    return "local"


_REAPERS: list = []  # held for the life of the process: their pipes close when it ends


def _reap_with_this_process() -> None:
    """The local Ray just started dies with this driver, even a killed one (pipelines/reaper.py)."""
    from . import reaper

    node = getattr(ray._private.worker, "_global_node", None)
    if node is not None:
        _REAPERS.append(reaper.watch(node.get_session_dir_path()))


_LAZY: dict = {}  # the RayConfig a job deferred its connection with, and how it connected


def defer(cfg: RayConfig) -> None:
    """Connect with `cfg` only when something needs Ray (`ensure`): a run whose stages are all
    complete, on a local output, starts no Ray at all."""
    _LAZY.clear()
    _LAZY["cfg"] = cfg


def ensure() -> str:
    """Connect now if not yet (with the deferred config, else the defaults); returns how."""
    if "how" not in _LAZY or not ray.is_initialized():  # (a test may have shut an earlier Ray down)
        _LAZY["how"] = connect(_LAZY.get("cfg") or RayConfig())
    return _LAZY["how"]


def connection() -> str:
    """How this job reached Ray: as `connect` says, or "not started" when nothing needed it."""
    return _LAZY.get("how", "existing" if ray.is_initialized() else "not started")


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


def cluster_cpus() -> int:
    """The cluster's CPUs now (1 at least: an autoscaling cluster may start with none)."""
    ensure()
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


MIN_IN_FLIGHT = 64  # enough queued demand for an autoscaler to launch CPU nodes from zero
LIMIT_REFRESH_S = 10.0


class _InFlightLimit:
    """How many tasks to keep submitted: twice the cluster's CPUs, re-read as nodes come and go.

    Fixed once, it would stay at the few CPUs of a fresh autoscaling cluster, whose autoscaler
    only grows to the demand it sees.
    """

    def __init__(self, fixed: int | None):
        self.fixed, self.value, self.read_at = fixed, 0, -float("inf")

    def __call__(self) -> int:
        if self.fixed:
            return self.fixed
        if time.monotonic() - self.read_at > LIMIT_REFRESH_S:
            cpus = int(ray.cluster_resources().get("CPU", 0))
            self.value, self.read_at = max(MIN_IN_FLIGHT, 2 * cpus), time.monotonic()
        return self.value


TASKS_PER_CPU = 4  # light passes: enough tasks to balance the load, few enough that Ray's overhead stays small


def batches(items: list, per_cpu: int = TASKS_PER_CPU) -> list[list]:
    """`items` in consecutive batches, at most `per_cpu` per CPU of the cluster (and one item at
    least each): light per-item work pays Ray's per-task cost once per batch, not per item."""
    n = per_cpu * cluster_cpus()
    size = max(1, -(-len(items) // n))
    return [items[i : i + size] for i in range(0, len(items), size)]


def remote_fn(fn: Callable, remote_args: dict):
    # A task lost with its worker or node is run again (Ray's system-failure retries, made
    # explicit), possibly after a partial first attempt: every `fn` must be idempotent,
    # writing its outputs atomically, or skipping what an earlier attempt finished.
    return ray.remote(**({"num_cpus": 1, "max_retries": 3} | remote_args))(fn)


class _StageBar:
    """One progress bar per stage: each `run_tasks` pass of the stage adds its tasks to the total
    and names its phase ("select (cut bins)"); no bar at all for a stage that runs no task."""

    def __init__(self, label: str):
        self.label, self.bar = label, None

    def add(self, desc: str, n: int):
        from ray.experimental import tqdm_ray

        phase = desc.split(": ", 1)[-1]
        if self.bar is None:
            self.bar = tqdm_ray.tqdm(total=0, desc=self.label)
        self.bar.total += n
        self.bar.set_description(f"{self.label} ({phase})")
        return self.bar

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


_STAGE_BARS = threading.local()  # per thread: the running stage's bar (the executor's `stage_progress`);
# a thread of its own (the report prepared during the write stage) keeps its passes off that bar


def _stage_bars() -> list:
    if not hasattr(_STAGE_BARS, "stack"):
        _STAGE_BARS.stack = []
    return _STAGE_BARS.stack


def progress_bar(desc: str, n: int):
    """(bar, whether it is the running stage's own) for a pass of `n` tasks; no bar without `desc`."""
    from ray.experimental import tqdm_ray

    if not desc:
        return None, False
    if _stage_bars():
        return _stage_bars()[-1].add(desc, n), True
    return tqdm_ray.tqdm(total=n, desc=desc), False


@contextlib.contextmanager
def stage_progress(label: str):
    """Within it, every `run_tasks` with a `desc` advances the stage's single bar."""
    _stage_bars().append(_StageBar(label))
    try:
        yield
    finally:
        _stage_bars().pop().close()


def run_tasks(
    fn: Callable, items: Iterable, *, max_in_flight: int | None = None, desc: str = "", **remote_args
) -> Iterator:
    """Run `fn(item)` as Ray tasks, a bounded number at once; yield results in order done."""
    ensure()
    items = list(items)
    remote = remote_fn(fn, remote_args)
    limit = _InFlightLimit(max_in_flight)
    bar, shared = progress_bar(desc, len(items))
    pending: deque = deque()
    queue = deque(items)
    try:
        while queue or pending:
            while queue and len(pending) < limit():
                pending.append(remote.remote(queue.popleft()))
            done, rest = ray.wait(list(pending), num_returns=1)
            pending = deque(rest)
            if bar:
                bar.update(1)
            yield ray.get(done[0])
    finally:
        if bar and not shared:
            bar.close()


def _each(job: tuple) -> list:
    fn, batch = job
    return [fn(item) for item in batch]


def run_batched(fn: Callable, items: Iterable, *, per_cpu: int = TASKS_PER_CPU, desc: str = "", **remote_args) -> Iterator:
    """Like `run_tasks`, for light per-item work: each task runs `fn` over a batch of consecutive
    items (`batches`), and every item's result is yielded, batch by batch as they finish."""
    jobs = [(fn, batch) for batch in batches(list(items), per_cpu)]
    for results in run_tasks(_each, jobs, desc=desc, **remote_args):
        yield from results


def submit_bounded(fn: Callable, items: Iterable, *, max_in_flight: int | None = None, **remote_args) -> list:
    """Like `run_tasks`, but returns every task's ref in submission order without fetching any
    result (for results that go on to another task, not to the driver)."""
    remote = remote_fn(fn, remote_args)
    limit = _InFlightLimit(max_in_flight)
    refs, running = [], []
    for item in items:
        while len(running) >= limit():
            _, running = ray.wait(running, num_returns=1, fetch_local=False)
        refs.append(remote.remote(item))
        running.append(refs[-1])
    return refs


def _reduce_task(reduce_fn: Callable, refs: list):
    """A reduce task: its inputs fetched one at a time (`reduce_fn` folds an iterator)."""
    return reduce_fn(ray.get(r) for r in refs)


def map_reduce(fn: Callable, items: Iterable, reduce_fn: Callable, *, fan_in: int = 8,
               max_in_flight: int | None = None, desc: str = "", **remote_args):
    """`reduce_fn` over `fn(item)` for every item, reduced in Ray tasks as results finish: groups of
    `fan_in` finished results are folded by a task into one, until one is left, and only that one
    reaches the driver. `reduce_fn` must fold an iterator of results into one of the same kind, and
    give the same answer in any grouping (exact sums, as Lloyd's fixed-point statistics)."""
    ensure()
    mapper, reducer = remote_fn(fn, remote_args), remote_fn(_reduce_task, remote_args)
    limit = _InFlightLimit(max_in_flight)
    queue = deque(items)
    if not queue:
        raise ValueError("map_reduce over no items")
    bar, shared = progress_bar(desc, len(queue))
    running: list = []  # map and reduce tasks not finished
    ready: list = []  # finished results not reduced yet (left in the object store)
    maps: set = set()  # the map tasks among `running` (the bar counts those)
    try:
        while queue or running or len(ready) > 1:
            while queue and len(running) < limit():
                running.append(mapper.remote(queue.popleft()))
                maps.add(running[-1])
            if len(ready) >= fan_in or (len(ready) > 1 and not queue and not running):
                batch, ready = ready[:fan_in], ready[fan_in:]
                running.append(reducer.remote(reduce_fn, batch))
                continue
            done, running = ray.wait(running, num_returns=1, fetch_local=False)
            if done[0] in maps:
                maps.discard(done[0])
                if bar:
                    bar.update(1)
            ready += done
        return ray.get(ready[0])
    finally:
        if bar and not shared:
            bar.close()


def resolve(value):
    """An ObjectRef handed inside a task argument (shared, put once) -> its value."""
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value
