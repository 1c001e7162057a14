"""The house's promise: a new policy or a new stage is one class, registered, configured by name.

Both are built here, in the test module, without touching a project file, and run end to end on
the demo shards through `ssl-prune run`'s own code path (config -> stage list -> executor).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pytest

from pipelines.cli import run
from pipelines.cli.config import validate_config
from pipelines.runtime import run_tasks
from pipelines.stage import STAGES, Context, Stage
from prune import schema
from prune.io.tables import read_scores
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
class ClusterSizesStats:
    shards_written: int


def _sizes_of_shard(task: tuple) -> str:
    """Ray task: one scores file -> toy/NNNNN.json, the ok samples per cluster."""
    out, shard, fp, min_count = task
    t = read_scores(out, shard, columns=[schema.STATUS, schema.CLUSTER])
    ok = t.column(schema.STATUS).to_numpy(zero_copy_only=False) == schema.STATUS_OK
    ids, counts = np.unique(t.column(schema.CLUSTER).to_numpy()[ok], return_counts=True)
    sizes = {str(i): int(c) for i, c in zip(ids, counts) if c >= min_count}
    out.write_json({"fingerprint": fp, "sizes": sizes}, "toy", f"{shard}.json")
    return shard


@dataclass
class ClusterSizesStage(Stage):
    """Per shard, how many ok samples each cluster holds: a stage between assign and select."""

    name = "toy_cluster_sizes"

    toy_cluster_sizes: ClusterSizesSettings = field(default_factory=ClusterSizesSettings)

    def done(self, ctx: Context, shard: str) -> bool:
        return ctx.out.exists("toy", f"{shard}.json") and ctx.out.read_json("toy", f"{shard}.json")["fingerprint"] == ctx.fingerprint

    def complete(self, ctx: Context) -> Optional[ClusterSizesStats]:
        if all(self.done(ctx, s) for s in ctx.shards):
            return ClusterSizesStats(0)
        return None

    def run(self, ctx: Context) -> ClusterSizesStats:
        tasks = [(ctx.out, s, ctx.fingerprint, self.toy_cluster_sizes.min_count) for s in sorted(ctx.shards)]
        return ClusterSizesStats(len(list(run_tasks(_sizes_of_shard, tasks, **self.resources(ctx).ray_args()))))


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
    assert st["toy_cluster_sizes"]["shards_written"] == manifest["counts"]["input_shards"]
    # the toy stage's outputs: every ok sample counted once
    sizes = [json.load(open(p))["sizes"] for p in sorted((run_copy / "toy").glob("*.json"))]
    c = manifest["counts"]
    assert sum(n for s in sizes for n in s.values()) == c["kept"] + c["pruned"]
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

    # a new toy setting: the toy re-runs and, its fingerprint being upstream of theirs, select and write too
    changed = run(_config(pipeline_run, run_copy, **{"toy_cluster_sizes.min_count": 2}))
    ch = changed["stages"]
    assert not ch["toy_cluster_sizes"]["reused"] and not ch["select"]["reused"] and not ch["write"]["reused"]
    assert ch["prototypes"]["reused"] and changed["counts"] == manifest["counts"]
    assert changed["fingerprints"]["select"] != manifest["fingerprints"]["select"]
    assert changed["fingerprints"]["assign"] == manifest["fingerprints"]["assign"]


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
