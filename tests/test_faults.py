"""Faults at every stage: worker nodes lost during refinement, assign and write; a driver killed
at a random moment, then run again. Outputs must equal an undisturbed run's, and a killed driver
must leave no Ray process of its own behind."""

from __future__ import annotations

import glob
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from ray._private import ray_constants

from prune import schema

from .conftest import REPO, assert_same_results, small_config, subprocess_env, watch_cli_run

RUN_TIMEOUT_S = 300


def _live_parents() -> dict[int, int]:
    """pid -> parent pid of every live process (from /proc: the parent is the 4th field of a stat;
    a zombie is dead, only not reaped yet, and left out)."""
    parents = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.split("/")[2])] = int(fields[1])
    return parents


def _workers_of(nodes) -> dict[int, str]:
    """pid -> node id of every process whose parent is one of `nodes`' raylets (Ray's workers)."""
    raylets = {n.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid: n.node_id for n in nodes}
    return {pid: raylets[parent] for pid, parent in _live_parents().items() if parent in raylets}


def _nodes_running(title: str, workers: dict[int, str]) -> set[str]:
    """Node ids of the `workers` now running a task `title`: Ray titles a worker `ray::<function>`
    while it runs one (`ray::IDLE` otherwise)."""
    busy = set()
    for pid, node in workers.items():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(f"ray::{title}".encode()):
                    busy.add(node)
        except OSError:
            continue
    return busy


def _catch_running(title: str, nodes, stop, seconds: float = 10.0) -> set[str]:
    """Watches `nodes`' workers without pausing until one runs a task `title` (tasks of small shards
    last milliseconds), or `stop()`, or `seconds`: -> the nodes running it then."""
    deadline = time.monotonic() + seconds
    workers, rescan = {}, 0.0
    while time.monotonic() < deadline and not stop():
        if time.monotonic() >= rescan:  # a task may start a new worker process
            workers, rescan = _workers_of(nodes), time.monotonic() + 0.05
        if busy := _nodes_running(title, workers):
            return busy
    return set()


def test_worker_lost_between_refine_passes_rebuilds_the_cached_blocks(pipeline_run, local_cluster):
    """Refinement keeps every task's blocks in the object stores of the nodes that read them. A
    worker node is killed after the first pass: the later passes need its blocks, which Ray
    rebuilds from the tasks that made them. The centroids equal an in-process reduce's, bit for bit."""
    from pipelines.stages.prototypes import RefineTask, ShardTask, count_ok, refine_all, refine_blocks
    from prune.cluster import lloyd
    from prune.cluster.settings import KMeansConfig
    from prune.io.storage import OutputDir
    from prune.io.tables import load_centroids

    cluster, workers = local_cluster({"num_cpus": 0}, [{"num_cpus": 1}] * 3)
    out = OutputDir(str(pipeline_run["out"]))
    shards = sorted(p.name[: -len(".parquet")] for p in (pipeline_run["out"] / "embeddings").glob("*.parquet"))
    shards = [s for s in shards if count_ok(ShardTask(out, s))[1]]
    c0 = np.roll(load_centroids(out), 1, axis=1)  # off the fit: every pass has work to do
    kc = KMeansConfig(refine_iters=4, refine_tol=0.0, refine_cache=True)
    killed = []

    def after_pass(entry):
        if not killed:
            cluster.remove_node(workers[0], allow_graceful=False)
            killed.append(entry["iteration"])

    ours, meta = refine_all(kc, out, shards, c0, {}, on_iteration=after_pass)
    # killed after the first pass (iterations count from 0), and every pass ran
    assert killed == [0] and meta["refine_cache"] and meta["refine"]["iterations"] == 4

    def one_by_one(c):
        return (refine_blocks(RefineTask(out, [(i, s)], c)) for i, s in enumerate(shards))

    reference, _ = lloyd.refine(c0, one_by_one, 4, 0.0)
    np.testing.assert_array_equal(ours, reference)


def test_nodes_lost_during_assign_and_write(pipeline_run, shards_dir, local_cluster, tmp_path):
    """Driver alone on the head; three 1-CPU workers. The node running an assign task is killed
    while it runs (the task runs again elsewhere), another once write has finished a fragment."""
    cluster, workers = local_cluster({"num_cpus": 0}, [{"num_cpus": 1}] * 3)
    out = tmp_path / "out"
    shutil.copytree(pipeline_run["out"], out)
    for stale in ("assign", "scores", "pruned", "prototypes"):  # embeddings reused; the rest made again
        shutil.rmtree(out / stale)
    (out / schema.MANIFEST).unlink()
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(small_config(shards_dir["dir"], out)))
    log_path = tmp_path / "run.log"
    alive = list(workers)
    killed: dict[str, str] = {}  # stage -> the log as it was when its node was killed

    def kill(stage: str, node_ids=None) -> None:
        victim = next((w for w in alive if node_ids is None or w.node_id in node_ids), None)
        if victim is not None:
            cluster.remove_node(victim, allow_graceful=False)
            alive.remove(victim)
            killed[stage] = log_path.read_text()

    def kill_in_assign_then_write() -> None:
        text = log_path.read_text()
        if "assign" not in killed and "stage prototypes:" in text and "stage assign:" not in text:
            busy = _catch_running("assign_shard", alive, lambda: "stage assign:" in log_path.read_text())
            if busy:
                kill("assign", busy)
        elif "write" not in killed and glob.glob(f"{out}/{schema.STAGING_DIR}/write-*/fragments/*.arrow"):
            kill("write")

    returncode, hung = watch_cli_run(config, log_path, kill_in_assign_then_write, RUN_TIMEOUT_S,
                                     RAY_ADDRESS=cluster.address)
    tail = log_path.read_text()[-6000:]
    assert not hung, f"the run did not finish in {RUN_TIMEOUT_S}s after {sorted(killed)} were hit:\n{tail}"
    assert returncode == 0, f"the run failed after nodes were lost during {sorted(killed)}:\n{tail}"
    assert set(killed) == {"assign", "write"}, f"only {sorted(killed)} were hit:\n{tail}"
    for stage, text in killed.items():  # each kill fell inside its stage: it had not reported its end
        assert f"stage {stage}:" not in text, f"the {stage} node was killed after the stage ended"
    assert_same_results(out, pipeline_run["out"])
    assert not os.path.exists(f"{out}/{schema.STAGING_DIR}")


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid`."""
    children: dict[int, list[int]] = {}
    for child, parent in _live_parents().items():
        children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


def _alive(pids: set[int]) -> set[int]:
    left = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    left.add(pid)
        except OSError:
            continue
    return left


@pytest.mark.parametrize("seed", [0])
def test_driver_killed_at_a_random_moment_then_run_again(pipeline_run, shards_dir, tmp_path, seed):
    """`ssl-prune run` with its own local Ray, SIGKILLed at a random moment of its run: none of the
    Ray processes it started outlives it, the re-run takes over its lock and the outputs equal the
    undisturbed run's."""
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    # a Ray of its own (not a cluster another test left on this machine)
    config.write_text(yaml.safe_dump(small_config(shards_dir["dir"], out) | {"ray": {"address": "local"}}))
    env = subprocess_env(PYTHONPATH=REPO)
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "pipelines.cli", "run", str(config)]
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log)
    # a random moment once Ray is up, inside embed or a later stage, but before select has ended,
    # so the kill always lands before write and the manifest (a faster run must not finish first)
    delay = random.Random(seed).uniform(4.0, 20.0)
    start = time.time()
    while proc.poll() is None and time.time() - start < delay and "stage select:" not in log_path.read_text():
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.skip(f"the run ended in {time.time() - start:.1f}s, before the kill")
    mine = _descendants(proc.pid)  # the raylet, GCS and workers it started
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(mine) >= 3, f"the driver had started only {len(mine)} processes: was Ray up?"
    deadline = time.time() + 15  # Ray's agents alone would wait about a minute on the dead GCS
    while time.time() < deadline and _alive(mine):
        time.sleep(0.5)
    left = _alive(mine)
    assert not left, f"Ray processes outlived the killed driver: {sorted(left)}"
    assert not (out / schema.MANIFEST).exists()  # it never finished
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert again.returncode == 0, again.stderr[-4000:]
    assert_same_results(out, pipeline_run["out"])
    assert not os.path.exists(f"{out}/{schema.STAGING_DIR}")
