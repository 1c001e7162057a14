"""The shared task runner: in-flight limit that follows the cluster, results and refs complete."""

from __future__ import annotations

import ray

from pipelines import runtime


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


def test_a_process_that_imports_pipelines_freezes_its_heap_at_exit():
    """Python's last collection skips frozen objects: the exit handler must have run before it.
    (Exit handlers run last-registered first, so the probe, registered before the import, runs
    after ours and sees what the final collection will see.)"""
    import subprocess
    import sys

    probe = ("import atexit, gc; atexit.register(lambda: print('frozen', gc.get_freeze_count())); "
             "print('before', gc.get_freeze_count()); import pipelines")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    counts = dict(line.split() for line in done.stdout.split("\n") if line)
    assert int(counts["before"]) == 0 and int(counts["frozen"]) > 1_000  # every object alive at exit
