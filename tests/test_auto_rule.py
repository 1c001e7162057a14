"""`select.policy: auto`: the pool's distance tail picks the clean or the web rule, the run does
what that rule does, and the manifest, bands.json and the report say what was chosen and why."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.cli.config import validate_config
from prune.select import auto
from prune.select.settings import SelectConfig
from prune.settings import ConfigError

from .conftest import read_scores, small_config


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_tail_quantiles_from_the_histogram_are_numpys_to_a_bin(seed):
    rng = np.random.default_rng(seed)
    d = np.concatenate([rng.gamma(4, 0.025, 5000), rng.uniform(0.4, 0.9, 60)])  # a body and a far tail
    hist = sum(auto.distance_histogram(part) for part in np.array_split(d, 7))  # summed as tasks fold it
    width = auto.TAIL_MAX / auto.TAIL_BINS
    for q in (auto.LOW_Q, auto.HIGH_Q):
        assert abs(auto.quantile(hist, q) - np.quantile(d, q, method="inverted_cdf")) <= width / 2
    ratio = np.quantile(d, 0.99) / np.quantile(d, 0.5)
    assert auto.choose(hist, ratio * 0.9).rule == auto.WEB and auto.choose(hist, ratio * 1.1).rule == auto.CLEAN
    web = auto.choose(hist, ratio * 0.9)
    assert web.settings == {"policy": "hard", "balanced": True, "budget": "dbp"} and "web-like" in web.reason
    assert auto.choose(hist, ratio * 1.1).settings == {"policy": "random", "balanced": False}


def test_auto_is_a_select_policy_counted_only_where_it_is_set():
    assert SelectConfig(policy="auto").is_auto
    assert "auto_tail_ratio" not in SelectConfig(policy="hard").fingerprinted()  # earlier selections keep theirs
    assert SelectConfig(policy="auto", auto_tail_ratio=4).fingerprinted() != SelectConfig(policy="auto").fingerprinted()
    with pytest.raises(ConfigError, match="select.auto_tail_ratio"):
        validate_config({"input": "a", "output": "b", "select": {"policy": "auto", "auto_tail_ratio": 0.5}})


@pytest.mark.parametrize("threshold, rule, explicit", [
    (1.01, auto.WEB, {"select.policy": "hard", "select.balanced": True, "select.budget": "dbp"}),
    (100.0, auto.CLEAN, {"select.policy": "random", "select.balanced": False}),
])
def test_a_run_with_auto_selects_as_the_rule_it_chose_and_says_why(run_copy, pipeline_run, threshold, rule, explicit):
    from pipelines.cli import run

    base = small_config(pipeline_run["cfg"].input, run_copy)
    manifest = run(validate_config(base | {"select": base["select"] | {"policy": "auto", "auto_tail_ratio": threshold}}))
    chosen = manifest["stages"]["select"]["auto"]
    assert chosen["rule"] == rule and chosen["threshold"] == threshold and chosen["samples"] > 0
    bands = json.loads((run_copy / "pruned" / "bands.json").read_text())
    assert bands["auto"]["rule"] == rule and bands["policy"] == chosen["settings"]["policy"]
    report = (run_copy / "report.html").read_text()
    assert f"select.policy auto chose the {rule} rule" in report
    kept = read_scores(run_copy).to_pandas().set_index(["shard", "key"])["keep"]
    explicit_cfg = small_config(pipeline_run["cfg"].input, run_copy)
    for dotted, value in explicit.items():
        explicit_cfg["select"][dotted.split(".")[1]] = value
    again = run(validate_config(explicit_cfg))
    assert "auto" not in again["stages"]["select"] or again["stages"]["select"]["auto"] is None
    assert read_scores(run_copy).to_pandas().set_index(["shard", "key"])["keep"].equals(kept)


def test_the_offline_image_text_config_curates_captions_then_copies_then_picks_a_rule(ray_cluster, tmp_path, monkeypatch):
    """configs/demo_text.yaml as shipped (the CLIP in models/), on a small web-like pool: the
    pairs whose caption does not describe the image go first, then near-copies, then auto."""
    import pyarrow.parquet as pq

    from pipelines.cli import run
    from pipelines.cli.config import load_config
    from prune import schema
    from prune.demo.web_like import write_web_like_shards

    from .conftest import REPO

    write_web_like_shards(str(tmp_path / "pool"), count=600, shard_size=300, seed=7)
    monkeypatch.chdir(REPO)  # the config names the shipped CLIP by a relative path
    manifest = run(load_config("configs/demo_text.yaml", [f"input={tmp_path / 'pool'}", f"output={tmp_path / 'out'}",
                                                          "kmeans.k=6"]))
    c = manifest["counts"]
    assert c["input_samples"] == 600 == c["kept"] + c["pruned"] + c["removed"] + c["failed"]
    assert set(c["removed_by_reason"]) <= {schema.STATUS_LOW_ALIGNMENT, schema.STATUS_NO_CAPTION, schema.STATUS_NEAR_DUPLICATE}
    assert manifest["stages"]["select"]["auto"]["rule"] in (auto.CLEAN, auto.WEB)
    kind = {}
    for p in sorted((tmp_path / "pool").glob("*.parquet")):
        t = pq.read_table(p, columns=["key", "caption_kind"]).to_pydict()
        kind.update(zip(t["key"], t["caption_kind"]))
    status = {r[schema.KEY]: r[schema.STATUS] for p in sorted((tmp_path / "out" / "scores").glob("*.parquet"))
              for r in pq.read_table(p, columns=[schema.KEY, schema.STATUS]).to_pylist()}
    caption_removed = {k for k, s in status.items() if s in (schema.STATUS_LOW_ALIGNMENT, schema.STATUS_NO_CAPTION)}
    bad = {k for k, v in kind.items() if v != "describes"}
    # the shipped CLIP tells a describing caption from the rest: most removals are the bad ones
    assert len(caption_removed & bad) > 0.8 * len(caption_removed) and len(caption_removed & bad) > 0.6 * len(bad)
