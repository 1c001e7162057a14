"""Shared fixtures: real Fashion-MNIST shards (good and bad), one local Ray, one pipeline run.

The Ray instance advertises one fake GPU, so every pipeline run in the tests exercises the
GPU scheduling path (embed actors ask for `num_gpus=1`); torch sees no CUDA, so they run on
the CPU. The CPU-only path is exercised by the CLI test, which starts its own Ray.
"""

from __future__ import annotations

import glob
import io
import math
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from pipelines.cli.config import validate_config
from prune import schema
from prune.demo.shards import write_bad_shards, write_demo_shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root, a str

# Every test that stops a Ray this process started waited 10-30 s in ray.shutdown(): the driver's
# OpenTelemetry metrics reader flushes to a metrics agent that no longer answers (a gdb stack of the
# hang). The tests read no metrics; the clusters they start (nodes and workers inherit this
# environment) export none. About 3 minutes of the suite.
os.environ.setdefault("RAY_enable_metrics_collection", "0")


def subprocess_env(**extra) -> dict:
    """This environment for a child process, without RAY_ADDRESS (it would join whatever Ray that
    names instead of the one the test means), plus `extra`."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | extra


def watch_cli_run(config, log_path, tick, timeout_s: float, **env) -> tuple[int | None, bool]:
    """`ssl-prune run CONFIG` in a process of its own (unbuffered: a progress bar's redraw reaches
    `log_path` at once), `tick()` called every 50 ms while it runs -> (exit code, hung). A run
    that outlasts `timeout_s` is killed, so nothing of it goes on using Ray after the test."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", str(config)], cwd=REPO,
                                env=subprocess_env(PYTHONPATH=REPO, PYTHONUNBUFFERED="1", **env), stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + timeout_s
        while proc.poll() is None and time.time() < deadline:
            tick()
            time.sleep(0.05)
    finally:
        hung = proc.poll() is None
        if hung:
            proc.kill()
        proc.wait()
    return proc.returncode, hung


def n_keep(f: float, n: int) -> int:
    """The select stage's counts rule: each group keeps round(f * n), halves up."""
    return math.floor(f * n + 0.5)

GOOD_SHARDS = 4
PER_SHARD = 60


def small_config(input_dir, output_dir, **overrides) -> dict:
    cfg = {
        "input": str(input_dir),
        "output": str(output_dir),
        "decode": {"batch_size": 32},
        "embed": {
            "model": "ViT-S-32",
            "allow_random_init": True,
            "batch_size": 32,
            "torch_threads": 2,
        },
        "kmeans": {"k": 4, "niter": 10, "assign_concurrency": 1},
        "select": {"keep_fraction": 0.6, "policy": "hard", "balanced": True},
        "write": {"samples_per_shard": 25, "band_step": 0.2},
    }
    for dotted, value in overrides.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


@pytest.fixture(scope="session")
def ray_cluster():
    start_session_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory):
    """4 good demo shards (240 real images) and the three bad fixtures after them."""
    root = tmp_path_factory.mktemp("data")
    d = root / "shards"
    paths = write_demo_shards(str(d), count=GOOD_SHARDS * PER_SHARD, shard_size=PER_SHARD, seed=1)
    bad = write_bad_shards(str(d), paths[0])
    bad |= _more_bad_shards(d, paths[0])
    return {"dir": d, "root": root, "good": paths, "bad": bad}


def _more_bad_shards(d, good_tar) -> dict:
    """A valid but empty tar, and one whose second sample has a member name that is not UTF-8."""
    nxt = max(int(p.name[:-4]) for p in d.glob("*.tar")) + 1
    empty, odd = d / f"{nxt:05d}.tar", d / f"{nxt + 1:05d}.tar"
    with tarfile.open(empty, "w"):
        pass
    with tarfile.open(good_tar) as src:
        jpgs = [(m, src.extractfile(m).read()) for m in src.getmembers() if m.name.endswith(".jpg")][:2]
    good_key = f"{nxt + 1:05d}0000"
    with tarfile.open(odd, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        for name, data in ((f"{good_key}.jpg", jpgs[0][1]), (f"{good_key}.txt", b"a photo of a thing"), (b"bad\xffname.jpg".decode("utf-8", "surrogateescape"), jpgs[1][1])):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return {
        "empty": {"path": str(empty), "shard": empty.name[:-4]},
        "non_utf8": {"path": str(odd), "shard": odd.name[:-4], "good_key": good_key},
    }


@pytest.fixture(scope="session")
def pipeline_run(ray_cluster, shards_dir, tmp_path_factory):
    """One complete run over good and bad shards; tests that change outputs work on a copy."""
    from pipelines.cli import run

    out = tmp_path_factory.mktemp("run") / "out"
    cfg = validate_config(small_config(shards_dir["dir"], out))
    manifest = run(cfg)
    return {"cfg": cfg, "manifest": manifest, "out": out}


@pytest.fixture
def run_copy(pipeline_run, tmp_path):
    """A private copy of the shared run's output directory."""
    dst = tmp_path / "out"
    shutil.copytree(pipeline_run["out"], dst)
    return dst


# --- A run's outputs, read back ---------------------------------------------------------------------


def read_scores(out) -> pa.Table:
    """All score files of the run in `out`, in shard order."""
    return pa.concat_tables(pq.read_table(p) for p in sorted(glob.glob(f"{out}/scores/*.parquet")))


def pruned_tars(out) -> list[str]:
    return sorted(glob.glob(f"{out}/pruned/*.tar"))


def tar_members(path) -> list[tuple[str, bytes]]:
    """(name, bytes) of every file member, in tar order."""
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


def read_pruned(out) -> dict[str, list[tuple[str, bytes]]]:
    """Pruned tar name -> its members (see `tar_members`), in name order."""
    return {os.path.basename(p): tar_members(p) for p in pruned_tars(out)}


COMPARED_SCORE_COLUMNS = [schema.KEY, schema.SHARD, schema.STATUS, schema.CLUSTER, schema.DISTANCE, schema.KEEP, schema.BAND]


def assert_same_results(out, ref) -> None:
    """Same embeddings, centroids, scores and pruned shards (member bytes, order and names)."""
    np.testing.assert_array_equal(np.load(f"{out}/prototypes/centroids.npy"), np.load(f"{ref}/prototypes/centroids.npy"))
    names = sorted(os.listdir(f"{ref}/embeddings"))
    assert sorted(os.listdir(f"{out}/embeddings")) == names
    for name in names:
        assert pq.read_table(f"{out}/embeddings/{name}").equals(pq.read_table(f"{ref}/embeddings/{name}")), name
    assert read_scores(out).select(COMPARED_SCORE_COLUMNS).equals(read_scores(ref).select(COMPARED_SCORE_COLUMNS))
    assert read_pruned(out) == read_pruned(ref)
    for name in ("sizes.json", "bands.json"):
        assert open(f"{out}/pruned/{name}").read() == open(f"{ref}/pruned/{name}").read()


def embed_actors() -> dict[str, dict]:
    """actor id -> state record of every embed actor this cluster has held (dead ones included)."""
    return {aid: a for aid, a in ray._private.state.actors().items() if "EmbedActor" in a["ActorClassName"]}


def embed_actor_nodes() -> dict[str, set[str]]:
    """node id -> states of the embed actors it held in this cluster's life (dead ones included)."""
    nodes: dict[str, set[str]] = {}
    for actor in embed_actors().values():
        nodes.setdefault(actor["Address"]["NodeID"], set()).add(actor["State"])
    return nodes


# --- Tests that need a Ray of their own (multi-node clusters, the S3 module's runtime_env) ---------

SESSION_RAY = {"num_cpus": 2, "num_gpus": 1, "include_dashboard": False, "configure_logging": False}


def start_session_ray(runtime_env: dict | None = None) -> None:
    """The Ray `ray_cluster` starts: 2 CPUs and one fake GPU, on this machine. A module whose
    workers need more (the S3 tests: the AWS_* variables) starts it with a `runtime_env`, under
    `own_ray_module`, which gives the plain one back after the module."""
    if not ray.is_initialized():
        ray.init(**SESSION_RAY, runtime_env=runtime_env)


def free_ports(n: int = 1) -> list[int]:
    """`n` distinct TCP ports free on 127.0.0.1 right now (held open together while chosen)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


_NEXT_TEST: dict = {}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    _NEXT_TEST["item"] = nextitem  # lets `own_ray` see whether the next test brings its own Ray too


OWN_RAY_FIXTURES = ("own_ray", "own_ray_module")


def _brings_own_ray(item) -> bool:
    return any(name in item.fixturenames for name in OWN_RAY_FIXTURES)


def pytest_collection_modifyitems(session, config, items):
    """The tests that bring their own Ray run last, one after another (each group keeps its order):
    the session's Ray is then stopped once for all of them instead of being started again, about
    5 s each time, after every one that sat between two tests using it."""
    items[:] = sorted(items, key=_brings_own_ray)


def _session_ray_replaced():
    """The session's Ray is shut down first and an equivalent one is back afterwards (if there was
    one), so the tests after work in any order. Between two tests that bring their own Ray in a
    row it stays down (the next would only shut it down again)."""
    had_session_ray = ray.is_initialized() or _NEXT_TEST.pop("session_ray_owed", False)
    ray.shutdown()
    yield
    ray.shutdown()
    nxt = _NEXT_TEST.get("item")
    if had_session_ray and nxt is not None and _brings_own_ray(nxt):
        _NEXT_TEST["session_ray_owed"] = True
    elif had_session_ray and nxt is not None:
        start_session_ray()


@pytest.fixture
def own_ray():
    """For a test that brings its own Ray (see `_session_ray_replaced`)."""
    yield from _session_ray_replaced()


@pytest.fixture(scope="module")
def own_ray_module():
    """For a module-scoped fixture that brings its own Ray for the rest of the module (the S3
    tests: `start_session_ray(runtime_env=...)`); the session's is back after the module."""
    yield from _session_ray_replaced()


@pytest.fixture(autouse=True)
def _session_ray_owed(request):
    """If the test `own_ray` left the session's Ray down for never got to `own_ray` (a fixture
    before it failed), the next test that does not bring its own Ray gets it back all the same."""
    if _NEXT_TEST.get("session_ray_owed") and not _brings_own_ray(request):
        _NEXT_TEST.pop("session_ray_owed")
        start_session_ray()


@pytest.fixture
def local_cluster(own_ray, monkeypatch):
    """A factory of `ray.cluster_utils.Cluster`s on this machine, the driver connected to the last.

    Cluster writes its address to /tmp/ray/ray_current_cluster, where any other `ray.init()` or
    `ssl-prune run` on this machine would find and join it (and remove the file at shutdown, even
    if it has become someone else's): both are turned off for the test, which only needs
    `cluster.address`. Every node keeps its sessions and logs under one short private temp dir.
    """
    import tempfile

    from ray import cluster_utils

    monkeypatch.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
    monkeypatch.setattr(ray._common.utils, "reset_ray_address", lambda *a, **k: None)
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: socket paths live under it
    clusters = []

    def make(head: dict, workers: list[dict]):
        common = {"object_store_memory": 100 * 2**20, "temp_dir": temp_dir}
        cluster = cluster_utils.Cluster(
            initialize_head=True, head_node_args=common | {"include_dashboard": False} | head
        )
        clusters.append(cluster)
        nodes = [cluster.add_node(**(common | w)) for w in workers]
        cluster.wait_for_nodes()
        ray.shutdown()
        ray.init(address=cluster.address, configure_logging=False)
        return cluster, nodes

    yield make
    ray.shutdown()
    for cluster in clusters:  # SIGKILL, no grace period: nothing of the cluster is kept
        for node in list(cluster.worker_nodes):
            cluster.remove_node(node, allow_graceful=False)
        if cluster.head_node is not None:
            cluster.remove_node(cluster.head_node, allow_graceful=False)
        cluster.shutdown()
    for _ in range(10):  # a killed node's log files may still be closing
        shutil.rmtree(temp_dir, ignore_errors=True)
        if not os.path.exists(temp_dir):
            break
        time.sleep(0.5)


@pytest.fixture(scope="module")
def one_faiss_thread():
    """Tiny faiss searches and fits: OpenMP threads would only spin against Ray's workers on 2 cores."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)
