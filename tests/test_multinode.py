"""The whole pipeline on multi-node Ray clusters simulated on this machine (`ray.cluster_utils`).

Nodes share the machine's 2 cores, so the clusters are small: 4 logical CPUs, 100 MB of object
store per node. The driver sits on the head node. Results must not depend on the cluster's shape:
a multi-node run gives byte-identical outputs to the session's single-node run of the same config.
"""

from __future__ import annotations

import time

import ray

from pipelines.cli.config import validate_config

from .conftest import assert_same_results, embed_actor_nodes, free_ports, small_config


def gpu_node_ids() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0}


def decode_task_nodes(address: str, timeout_s: float = 20) -> set[str]:
    """Nodes that ran decode tasks, from the state API (task events reach it asynchronously)."""
    from ray.util.state import list_tasks

    deadline = time.time() + timeout_s
    while True:
        tasks = list_tasks(address=address, filters=[("name", "=", "MapBatches(decode_rows)")], detail=True, limit=10_000)
        nodes = {t.node_id for t in tasks if t.state == "FINISHED" and t.node_id}
        if nodes or time.time() > deadline:
            return nodes
        time.sleep(1)


def test_embed_actors_only_on_gpu_nodes_and_results_match_one_node(pipeline_run, shards_dir, local_cluster, tmp_path):
    """Head (driver, 1 CPU) + 2 CPU nodes + 1 node with a fake GPU: the embed actor must land on
    the GPU node (it asks for `num_gpus=1`) while decode and the rest use the CPU nodes."""
    from pipelines.cli import run

    # the dashboard serves the state API that tells where tasks ran (ray[default], a dependency)
    head = {"num_cpus": 1, "include_dashboard": True, "dashboard_port": free_ports(1)[0]}
    cluster, _ = local_cluster(head, [{"num_cpus": 1}, {"num_cpus": 1}, {"num_cpus": 1, "num_gpus": 1}])
    assert len([n for n in ray.nodes() if n["Alive"]]) == 4 and ray.cluster_resources()["GPU"] == 1
    out = tmp_path / "out"
    manifest = run(validate_config(small_config(shards_dir["dir"], out)))

    assert manifest["ray"] == "existing" and manifest["stages"]["embed"]["actor_resources"]["num_gpus"] == 1
    placed = embed_actor_nodes()
    assert placed and set(placed) <= gpu_node_ids(), f"embed actors on {placed}, GPU nodes {gpu_node_ids()}"
    decoded_on = decode_task_nodes(cluster.address)
    assert decoded_on, "the state API reports no finished decode task"
    assert decoded_on - gpu_node_ids(), f"decode ran only on the GPU node: {decoded_on}"
    assert manifest["counts"] == pipeline_run["manifest"]["counts"]
    assert_same_results(out, pipeline_run["out"])


def test_cpu_only_multinode_cluster_runs_and_matches(pipeline_run, shards_dir, local_cluster, tmp_path):
    """No GPU anywhere: CPU actors (num_gpus=0), same results as the single-node GPU-path run."""
    from pipelines.cli import run

    local_cluster({"num_cpus": 1}, [{"num_cpus": 1}, {"num_cpus": 2}])
    assert "GPU" not in ray.cluster_resources()
    out = tmp_path / "out"
    manifest = run(validate_config(small_config(shards_dir["dir"], out)))

    assert manifest["stages"]["embed"]["actor_resources"]["num_gpus"] == 0
    assert manifest["stages"]["embed"]["torch_threads"] == 2  # set by the config, as in the reference
    assert embed_actor_nodes()
    assert manifest["counts"] == pipeline_run["manifest"]["counts"]
    assert_same_results(out, pipeline_run["out"])
