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
