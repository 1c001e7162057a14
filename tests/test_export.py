"""The export stage: the kept set as ids (Parquet, DataComp's subset file), joined to the input's
img2dataset parquet, on the shared run's real shards (good ones with a uid column, bad ones without)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.cli import run
from pipelines.cli.config import validate_config
from prune import schema
from prune.io.exports import DATACOMP_FILE, uid_pairs
from prune.settings import ConfigError

from .conftest import read_scores, small_config

STAGES = ["embed", "prototypes", "assign", "select", "export"]


def _config(pipeline_run, out, stages=STAGES, **overrides):
    return validate_config(small_config(pipeline_run["cfg"].input, out, stages=stages, **overrides))


def _input_uids(shards_dir) -> dict[tuple[str, str], str]:
    """(shard, key) -> uid, read straight from the parquet files beside the good tars."""
    found = {}
    for tar in shards_dir["good"]:
        t = pq.read_table(tar[:-4] + ".parquet", columns=["key", "uid"])
        shard = tar.rsplit("/", 1)[1][:-4]
        found |= {(shard, k): u for k, u in zip(t.column("key").to_pylist(), t.column("uid").to_pylist())}
    return found


def test_kept_uids_exported_as_parquet_and_datacomp_subset(pipeline_run, run_copy, shards_dir):
    manifest = run(_config(pipeline_run, run_copy, **{"export.id_col": "uid", "export.formats": ["parquet", "datacomp"]}))
    stats = manifest["stages"]["export"]
    assert manifest["stages"]["prototypes"]["reused"] and not stats["reused"]
    scores = read_scores(run_copy).to_pylist()
    kept = {(r["shard"], r["key"]) for r in scores if r["keep"]}
    uids = _input_uids(shards_dir)
    # the scores carry the chosen id (joined on key): null only where a shard has no parquet
    assert all(r["uid"] == uids.get((r["shard"], r["key"])) for r in scores)
    assert sum(r["uid"] is not None for r in scores) == len(uids) > 0
    good = {s for s, _ in uids}
    # every kept sample of a shard with a uid column is exported once, with its own uid and url
    rows = pq.read_table(run_copy / schema.EXPORT_IDS_DIR).to_pylist()
    assert {(r["shard"], r["key"]) for r in rows} == {k for k in kept if k[0] in good}
    assert len(rows) == stats["kept"] and all(r["uid"] == uids[(r["shard"], r["key"])] for r in rows)
    assert all(r["url"].startswith("https://") and r["caption"] for r in rows)
    # shards without the column (no parquet beside them) are named with the reason, not fatal
    bad = {s for s, _ in kept} - good
    assert bad and bad <= set(stats["shard_failures"]) and all("export.id_col 'uid'" in why
                                                              for why in stats["shard_failures"].values())
    # DataComp's file: u8,u8 pairs, sorted, the kept uids exactly (converted here independently)
    subset = np.load(run_copy / schema.EXPORT_DIR / DATACOMP_FILE)
    assert subset.dtype == np.dtype("u8,u8") and len(subset) == stats["datacomp_uids"] == len(rows)
    as_ints = [(int(a) << 64) | int(b) for a, b in subset.tolist()]
    assert as_ints == sorted(as_ints) == sorted(int(uids[k], 16) for k in kept if k[0] in good)
    # a re-run finds it complete
    assert run(_config(pipeline_run, run_copy, **{"export.id_col": "uid", "export.formats": ["parquet", "datacomp"]})
               )["stages"]["export"]["reused"]


def test_key_export_needs_no_parquet_and_a_missing_id_column_is_a_config_error(pipeline_run, run_copy):
    manifest = run(_config(pipeline_run, run_copy, **{"export.columns": []}))
    assert manifest["stages"]["export"]["kept"] == manifest["counts"]["kept"]  # the key is always there
    assert not manifest["stages"]["export"]["shard_failures"]
    assert set(pq.read_table(run_copy / schema.EXPORT_IDS_DIR).column_names) == {
        schema.KEY, schema.SHARD, schema.DISTANCE, schema.CLUSTER, schema.BAND}
    with pytest.raises(ConfigError, match="export.id_col 'nope' is not a column of shard 00000's parquet"):
        run(_config(pipeline_run, run_copy, **{"export.id_col": "nope"}))


def test_an_export_setting_re_runs_the_export_alone(pipeline_run, run_copy):
    """[..., select, export, write]: a new export.columns makes the ids again and leaves the pruned
    shards as they are (write reads the selection, not the export)."""
    stages = ["embed", "prototypes", "assign", "select", "export", "write"]
    first = run(_config(pipeline_run, run_copy, stages=stages))
    shards = {p.name: p.stat().st_mtime_ns for p in (run_copy / schema.PRUNED_DIR).iterdir()}
    again = run(_config(pipeline_run, run_copy, stages=stages, **{"export.columns": ["url"]}))
    st = again["stages"]
    assert not st["export"]["reused"] and st["write"]["reused"] and st["select"]["reused"]
    assert {p.name: p.stat().st_mtime_ns for p in (run_copy / schema.PRUNED_DIR).iterdir()} == shards
    assert "caption" not in pq.read_table(run_copy / schema.EXPORT_IDS_DIR).column_names
    assert first["fingerprints"]["write"] == again["fingerprints"]["write"] != first["fingerprints"]["export"]


def test_uids_that_are_not_128_bit_hex_are_left_out_and_returned():
    pairs, bad = uid_pairs(["0" * 31 + "1", "f" * 32, "xyz", "1" * 33, None])
    assert pairs.tolist() == [(0, 1), (2**64 - 1, 2**64 - 1)] and bad == ["xyz", "1" * 33, None]
