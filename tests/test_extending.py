"""The house's promise: a new policy or a new stage is one class, registered, configured by name.

Both are built here, in the test module, without touching a project file, and run end to end on
the demo shards through `ssl-prune run`'s own code path (config -> stage list -> executor).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import run
from pipelines.cli.config import validate_config
from pipelines.shard_stage import ShardStage
from pipelines.stage import STAGES
from prune import schema
from prune.io.tables import read_assignment
from prune.select.policies import POLICIES, Policy
from prune.settings import ConfigError, Section

from .conftest import read_scores as read_all_scores
from .conftest import small_config

TARGET = 0.3  # the toy policy keeps distances near this first


class MiddlePolicy(Policy):
    """Keeps the samples whose distance is nearest TARGET first: neither the easiest nor the hardest."""

    name = "toy_middle"

    @staticmethod
    def value(distance, shard, keys, seed):
        return np.clip(1.0 - np.abs(distance - TARGET), 0.0, 1.0)


class ClusterSizesSettings(Section):
    min_count: int = 0  # clusters with fewer ok samples in a shard are left out of its file


@dataclass
class ClusterSizesStage(ShardStage):
    """Per shard, how many ok samples each cluster holds (toy/NNNNN.parquet): a stage reading the
    assignment, placed between assign and select; the executor runs its shards."""

    name = "toy_cluster_sizes"
    reads = ("assign",)
    output_dir = "toy"

    toy_cluster_sizes: ClusterSizesSettings = field(default_factory=ClusterSizesSettings)

    def process_shard(self, job) -> dict:
        t = read_assignment(job.out, job.shard, columns=[schema.STATUS, schema.CLUSTER])
        ok = t.column(schema.STATUS).to_numpy(zero_copy_only=False) == schema.STATUS_OK
        ids, counts = np.unique(t.column(schema.CLUSTER).to_numpy()[ok], return_counts=True)
        big = counts >= self.toy_cluster_sizes.min_count
        self.write_shard(job, pa.table({schema.CLUSTER: ids[big], "count": counts[big]}))
        return {"ok_samples": int(counts[big].sum())}


@pytest.fixture
def toys():
    POLICIES.register(MiddlePolicy)
    STAGES.register(ClusterSizesStage)
    yield
    POLICIES.unregister(MiddlePolicy.name)
    STAGES.unregister(ClusterSizesStage.name)


STAGE_LIST = ["embed", "prototypes", "assign", "toy_cluster_sizes", "select", "write"]


def _config(pipeline_run, out, **over):
    return validate_config(small_config(pipeline_run["cfg"].input, out, **({
        "stages": STAGE_LIST, "select.policy": "toy_middle", "select.balanced": False, "select.keep_fraction": 0.5,
    } | over)))


def test_a_toy_policy_and_a_toy_stage_run_end_to_end(toys, pipeline_run, run_copy):
    manifest = run(_config(pipeline_run, run_copy, **{"toy_cluster_sizes.min_count": 1}))
    st = manifest["stages"]
    assert list(st) == STAGE_LIST  # the executor ran the configured list, in order
    assert st["embed"]["shards_embedded"] == 0 and st["prototypes"]["reused"]  # upstream of the toy: reused
    assert st["toy_cluster_sizes"]["shards_computed"] == manifest["counts"]["input_shards"]
    # the toy stage's outputs: every ok sample counted once
    sizes = pa.concat_tables(pq.read_table(p) for p in sorted((run_copy / "toy").glob("*.parquet")))
    c = manifest["counts"]
    assert sum(sizes.column("count").to_pylist()) == c["kept"] + c["pruned"] == st["toy_cluster_sizes"]["totals"]["ok_samples"]
    # the toy policy decided the selection: kept samples are the ones nearest TARGET
    scores = read_all_scores(run_copy).to_pylist()
    kept = [abs(r[schema.DISTANCE] - TARGET) for r in scores if r[schema.KEEP]]
    pruned = [abs(r[schema.DISTANCE] - TARGET) for r in scores if r[schema.STATUS] == "ok" and not r[schema.KEEP]]
    assert kept and pruned and max(kept) <= min(pruned)
    assert c["kept"] == int(np.floor(0.5 * (c["kept"] + c["pruned"]) + 0.5))
    assert json.load(open(run_copy / "pruned" / "bands.json"))["policy"] == "toy_middle"
    assert manifest["config"]["toy_cluster_sizes"] == {"min_count": 1}

    # the same command again: every stage, the toy's included, is complete and reused
    again = run(_config(pipeline_run, run_copy, **{"toy_cluster_sizes.min_count": 1}))
    assert all(s["reused"] for s in again["stages"].values()) and again["counts"] == manifest["counts"]

    # a new toy setting: the toy re-runs; select and write do not read it, so they are reused
    changed = run(_config(pipeline_run, run_copy, **{"toy_cluster_sizes.min_count": 2}))
    ch = changed["stages"]
    assert not ch["toy_cluster_sizes"]["reused"] and ch["select"]["reused"] and ch["write"]["reused"]
    assert ch["prototypes"]["reused"] and changed["counts"] == manifest["counts"]
    assert changed["fingerprints"]["select"] == manifest["fingerprints"]["select"]
    assert changed["fingerprints"]["toy_cluster_sizes"] != manifest["fingerprints"]["toy_cluster_sizes"]


def test_the_toys_are_configured_and_checked_by_name(toys, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'toy_cluster_sizes\.min_cnt'"):
        validate_config(small_config(tmp_path, tmp_path, **{"toy_cluster_sizes.min_cnt": 1}))
    with pytest.raises(ConfigError, match=r"unknown select\.policy 'toy_midle'; known: .*toy_middle"):
        validate_config(small_config(tmp_path, tmp_path, **{"select.policy": "toy_midle"}))
    with pytest.raises(ConfigError, match=r"unknown stage 'toy_sizes'; known: .*toy_cluster_sizes"):
        validate_config(small_config(tmp_path, tmp_path, stages=["embed", "toy_sizes"]))
    cfg = validate_config(small_config(tmp_path, tmp_path, stages=STAGE_LIST))
    assert [s.name for s in cfg.stage_list()] == STAGE_LIST
    assert isinstance(cfg.stage_list()[3].toy_cluster_sizes, ClusterSizesSettings)


def test_unregistered_names_are_refused_again(tmp_path):
    """Without the fixture the toys are unknown: registration is what makes a name valid."""
    with pytest.raises(ConfigError, match="unknown select.policy 'toy_middle'"):
        validate_config(small_config(tmp_path, tmp_path, **{"select.policy": "toy_middle"}))
    assert "toy_cluster_sizes" not in STAGES
