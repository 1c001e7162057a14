"""A worker node lost in the middle of a run: Ray retries what ran there, and no sample is lost
or written twice. The outputs are compared with the session's undisturbed run of the same config.
"""

from __future__ import annotations

import glob
import os
import threading
import time

import ray

from prune import schema
from prune.config import validate_config

from .conftest import small_config
from .test_multinode import _pruned, _scores, assert_same_results


def _alive_embed_actor_node() -> str | None:
    for actor in ray._private.state.actors().values():
        if "EmbedActor" in actor["ActorClassName"] and actor["State"] == "ALIVE":
            return actor["Address"]["NodeID"]
    return None


def test_node_lost_during_embedding_loses_and_duplicates_nothing(pipeline_run, shards_dir, local_cluster, tmp_path):
    """Driver alone on the head (0 CPUs); three 1-CPU workers. Once the first embeddings file
    exists (round 1 of 3 done, round 2 running), the node holding the embed actor is killed."""
    from pipelines.run import run

    cluster, workers = local_cluster({"num_cpus": 0}, [{"num_cpus": 1}, {"num_cpus": 1}, {"num_cpus": 1}])
    out = tmp_path / "out"
    cfg = validate_config(small_config(shards_dir["dir"], out, **{"embed.shards_per_round": 3}))
    result: dict = {}

    def target():
        try:
            result["manifest"] = run(cfg)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    killed = None
    deadline = time.time() + 240
    while time.time() < deadline and thread.is_alive() and killed is None:
        if glob.glob(f"{out}/{schema.EMBEDDINGS_DIR}/*.parquet"):
            node_id = _alive_embed_actor_node()
            victim = next((w for w in workers if w.node_id == node_id), None)
            if victim is not None:
                cluster.remove_node(victim, allow_graceful=False)
                killed, killed_at = node_id, time.time()
        time.sleep(0.2)
    thread.join(timeout=max(1, deadline - time.time()))
    assert not thread.is_alive(), "the run did not finish after the node was lost"
    assert "error" not in result, f"the run failed after the node was lost: {result.get('error')!r}"
    assert killed, "the run finished before a node could be killed"
    embed_actors = [a for a in ray._private.state.actors().values() if "EmbedActor" in a["ActorClassName"]]
    print(f"killed node {killed[:8]} {time.time() - killed_at:.1f}s before the run ended; embed actors: "
          + ", ".join(f"{a['Address']['NodeID'][:8]} {a['State']} restarts={a['NumRestarts']}" for a in embed_actors))
    # the actor that was on the lost node did its work elsewhere (restarted, or a new one)
    assert any(a["Address"]["NodeID"] != killed for a in embed_actors)

    manifest = result["manifest"]
    assert manifest["counts"] == pipeline_run["manifest"]["counts"]
    scores = _scores(out)
    ids = list(zip(scores.column(schema.SHARD).to_pylist(), scores.column(schema.KEY).to_pylist()))
    assert len(ids) == len(set(ids))
    members = [name for tar in _pruned(out).values() for name, _ in tar]
    assert len(members) == len(set(members))
    assert_same_results(out, pipeline_run["out"])
    assert not os.path.exists(f"{out}/{schema.STAGING_DIR}")


def test_the_session_ray_is_back_after_tests_with_their_own(ray_cluster):
    """In file order this runs after the multi-node and node-loss tests: the Ray the rest of the
    suite expects (2 CPUs, one fake GPU, one node) is there again."""
    assert ray.is_initialized()
    assert len([n for n in ray.nodes() if n["Alive"]]) == 1
    resources = ray.cluster_resources()
    assert resources["CPU"] == 2 and resources["GPU"] == 1
