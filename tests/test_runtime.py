"""The shared task runner: in-flight limit that follows the cluster, results and refs complete."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import ray

from pipelines import runtime

from .conftest import REPO, subprocess_env


def _square(x: int) -> int:
    return x * x


def test_in_flight_limit_follows_the_cluster_with_a_floor(ray_cluster, monkeypatch):
    cpus = int(ray.cluster_resources()["CPU"])
    assert runtime._InFlightLimit(None)() == max(runtime.MIN_IN_FLIGHT, 2 * cpus)
    assert runtime._InFlightLimit(3)() == 3  # an explicit bound is kept as given
    monkeypatch.setattr(runtime, "MIN_IN_FLIGHT", 1)
    monkeypatch.setattr(runtime, "LIMIT_REFRESH_S", 0.0)
    limit = runtime._InFlightLimit(None)
    assert limit() == 2 * cpus  # re-read from the cluster, not the floor


def test_run_tasks_and_submit_bounded_return_every_result(ray_cluster):
    items = list(range(25))
    got = sorted(runtime.run_tasks(_square, items, max_in_flight=2, num_cpus=0.5))
    assert got == [i * i for i in items]
    refs = runtime.submit_bounded(_square, items, max_in_flight=3, num_cpus=0.5)
    assert ray.get(refs) == [i * i for i in items]  # refs in submission order


def _as_list(x: int) -> list:
    return [x]


def _concat_sorted(parts) -> list:
    """A fold whose result shows every input it was given (a sorted concatenation)."""
    return sorted(v for part in parts for v in part)


def _counted_concat(parts) -> list:
    return _concat_sorted(parts) + [-1]  # one marker per reduce task that ran


def test_map_reduce_folds_in_tasks_and_returns_one_result(ray_cluster):
    items = list(range(37))
    assert runtime.map_reduce(_as_list, items, _concat_sorted, fan_in=3, max_in_flight=4, num_cpus=0.5) == items
    # every result was folded in tasks, in groups of at most fan_in: 37 leaves need >= 18 reduce tasks
    # with fan-in 3 (each removes at most 2 of the pending results), and the driver got one list
    got = runtime.map_reduce(_as_list, items, _counted_concat, fan_in=3, max_in_flight=4, num_cpus=0.5)
    assert [v for v in got if v >= 0] == items and got.count(-1) >= 18
    assert runtime.map_reduce(_as_list, [5], _concat_sorted) == [5]  # one item: no reduce at all


def _pid_of(x: int) -> tuple[int, int]:
    import os

    return x, os.getpid()


def test_run_batched_runs_few_tasks_and_yields_every_item(ray_cluster):
    cpus = int(ray.cluster_resources()["CPU"])
    items = list(range(37))
    parts = runtime.batches(items, per_cpu=2)
    assert len(parts) <= 2 * cpus and [x for p in parts for x in p] == items  # consecutive, complete
    assert runtime.batches([1, 2], per_cpu=8) == [[1], [2]]  # never an empty batch
    got = list(runtime.run_batched(_pid_of, items, per_cpu=2, num_cpus=0.5))
    assert sorted(x for x, _ in got) == items
    # each batch ran in one task: its items share a worker process and come out together, in order
    position = {x: i for i, (x, _) in enumerate(got)}
    for part in parts:
        at = position[part[0]]
        assert [x for x, _ in got[at : at + len(part)]] == part
        assert len({pid for _, pid in got[at : at + len(part)]}) == 1


def _python(code: str, **env) -> dict:
    """Run `code` in a fresh interpreter; -> its printed `name value` lines, as a dict."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=subprocess_env(PYTHONPATH=REPO, **env))
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)


# Exit handlers run last-registered first: this one, registered before anything of ours is imported,
# runs after every handler of ours and sees what Python's final collection will see
FREEZE_PROBE = "import atexit, gc; atexit.register(lambda: print('frozen', gc.get_freeze_count(), flush=True))\n"


def test_importing_our_packages_neither_freezes_at_exit_nor_takes_fd_2():
    """The Python API's imports neither freeze the heap at exit nor put a filter in front of fd 2:
    both are the CLI's alone."""
    code = FREEZE_PROBE + textwrap.dedent("""
        import os, threading
        before = os.fstat(2)
        import prune, pipelines, pipelines.cli, pipelines.cli.jobs, pipelines.cli.noise, pipelines.runtime
        from pipelines import quick_exit
        print("fd2_same", os.fstat(2) == before)
        print("filter_thread", any(t.name == "stderr-filter" for t in threading.enumerate()))
        print("installed", quick_exit.installed())
    """)
    got = _python(code)
    assert got == {"fd2_same": "True", "filter_thread": "False", "installed": "False", "frozen": "0"}


CLI_RUN = FREEZE_PROBE + textwrap.dedent("""
    import ray
    import pipelines.cli.jobs as jobs
    from pipelines import quick_exit, runtime

    @ray.remote(num_cpus=0)
    def worker_state():
        import os
        from pipelines import quick_exit
        return quick_exit.installed(), os.environ.get("FROM_THE_JOB")

    def run(cfg):  # the run verb's job, cut down to joining Ray and asking a worker
        print("connected", runtime.connect(cfg.ray).split(":")[0])
        installed, job_var = ray.get(worker_state.remote())
        print("worker_installed", installed)
        print("worker_job_var", job_var)
        return {"counts": {"input_shards": 0}}

    jobs.run = run
    from pipelines.cli import main
    print("rc", main(["run", "demo"]))
    print("driver_installed", quick_exit.installed())
""")


def test_the_cli_freezes_its_heap_at_exit_and_its_ray_workers_too(ray_cluster):
    """`ssl-prune run` (its job replaced by a probe) joins the session's Ray as a submitted job
    would: the driver freezes at exit, a worker of its job ran the setup hook, and the job's own
    runtime_env (an env var, as `ray job submit --runtime-env-json` gives) was kept beside it."""
    job = json.dumps({"runtime_env": {"env_vars": {"FROM_THE_JOB": "kept"}}})
    got = _python(CLI_RUN, RAY_ADDRESS=ray.get_runtime_context().gcs_address, **{runtime.JOB_CONFIG_ENV: job})
    assert got["rc"] == "0" and got["connected"] == "address"
    assert got["driver_installed"] == "True" and int(got["frozen"]) > 1_000  # every object alive at exit
    assert got["worker_installed"] == "True" and got["worker_job_var"] == "kept"


def _installed() -> bool:
    from pipelines import quick_exit

    return quick_exit.installed()


def test_the_python_api_gets_no_worker_hook(ray_cluster, monkeypatch):
    """Without the CLI's mark no hook is asked for, and a worker that imports us does not freeze;
    with it, none where the job has a setup hook of its own or the address is Ray Client's."""
    assert runtime.worker_runtime_env() is None
    assert ray.get(ray.remote(num_cpus=0)(_installed).remote()) is False
    monkeypatch.setattr(runtime, "_QUICK_EXIT", [True])
    assert callable(runtime.worker_runtime_env()["worker_process_setup_hook"])
    assert runtime.worker_runtime_env("ray://head:10001") is None
    monkeypatch.setenv(runtime.JOB_CONFIG_ENV, json.dumps({"runtime_env": {"worker_process_setup_hook": "theirs.setup"}}))
    assert runtime.worker_runtime_env() is None
