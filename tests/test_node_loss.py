"""A worker node lost in the middle of a run: Ray retries what ran there, and no sample is lost
or written twice. The outputs are compared with the session's undisturbed run of the same config.
"""

from __future__ import annotations

import glob
import json
import os
import time

import pytest
import yaml

from prune import schema

from .conftest import (
    assert_same_results,
    embed_actor_nodes,
    embed_actors,
    read_pruned,
    read_scores,
    small_config,
    watch_cli_run,
)

RUN_TIMEOUT_S = 300


def test_node_lost_during_embedding_loses_and_duplicates_nothing(pipeline_run, shards_dir, local_cluster, tmp_path):
    """Driver alone on the head (0 CPUs); three 1-CPU workers. Once the first embeddings file
    exists (a shard finalized, the others in flight), the node holding the embed actor is killed.

    The run is `ssl-prune run` in a process of its own, joined to the cluster: if it hangs it is
    killed and the test fails, and nothing of it goes on using Ray after the cluster is gone."""
    cluster, workers = local_cluster({"num_cpus": 0}, [{"num_cpus": 1}, {"num_cpus": 1}, {"num_cpus": 1}])
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(small_config(shards_dir["dir"], out)))
    log_path = tmp_path / "run.log"
    killed, killed_at = None, None

    def kill_the_embed_node() -> None:
        nonlocal killed, killed_at
        if killed is None and glob.glob(f"{out}/{schema.EMBEDDINGS_DIR}/*.parquet"):
            node_id = next((n for n, states in embed_actor_nodes().items() if "ALIVE" in states), None)
            victim = next((w for w in workers if w.node_id == node_id), None)
            if victim is not None:
                cluster.remove_node(victim, allow_graceful=False)
                killed, killed_at = node_id, time.time()

    returncode, hung = watch_cli_run(config, log_path, kill_the_embed_node, RUN_TIMEOUT_S, RAY_ADDRESS=cluster.address)
    run_log = log_path.read_text()[-6000:]
    if hung:
        pytest.fail(f"the run did not finish in {RUN_TIMEOUT_S}s (node killed: {killed is not None}); killed it. Its log:\n{run_log}")
    assert returncode == 0, f"the run failed (exit {returncode}) after the node was lost:\n{run_log}"
    assert killed, "the run finished before a node could be killed"
    actors = list(embed_actors().values())
    print(f"killed node {killed[:8]} {time.time() - killed_at:.1f}s before the run ended; embed actors: "
          + ", ".join(f"{a['Address']['NodeID'][:8]} {a['State']} restarts={a['NumRestarts']}" for a in actors))
    # the actor that was on the lost node did its work elsewhere (restarted, or a new one)
    assert any(a["Address"]["NodeID"] != killed for a in actors)

    manifest = json.loads((out / schema.MANIFEST).read_text())
    assert manifest["ray"] == f"address:{cluster.address}"
    assert manifest["counts"] == json.loads((pipeline_run["out"] / schema.MANIFEST).read_text())["counts"]
    scores = read_scores(out)
    ids = list(zip(scores.column(schema.SHARD).to_pylist(), scores.column(schema.KEY).to_pylist()))
    assert len(ids) == len(set(ids))
    members = [name for tar in read_pruned(out).values() for name, _ in tar]
    assert len(members) == len(set(members))
    assert_same_results(out, pipeline_run["out"])
    assert not os.path.exists(f"{out}/{schema.STAGING_DIR}")
