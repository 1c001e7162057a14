"""The import stage: precomputed embeddings (our own Parquet layout, clip-retrieval's npy +
metadata) start a run at prototypes, with no tar shards at all; scores and id exports work."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import run
from pipelines.cli.config import validate_config
from prune import schema
from prune.io.exports import DATACOMP_FILE
from prune.settings import ConfigError

from .conftest import read_scores

STAGES = ["import", "prototypes", "assign", "select", "export"]


def _config(out, **sections):
    cfg = {"output": str(out), "stages": STAGES, "kmeans": {"k": 4, "niter": 10},
           "select": {"keep_fraction": 0.5, "policy": "hard", "balanced": True}} | sections
    return validate_config(cfg)


def _source(pipeline_run):
    """The shared run's embeddings, as (keys, float32 vectors or NaN for failed rows), all shards."""
    t = pq.read_table(pipeline_run["out"] / schema.EMBEDDINGS_DIR)
    dim = t.schema.field(schema.EMBEDDING).type.list_size
    vec = np.array([v if v is not None else [np.nan] * dim for v in t.column(schema.EMBEDDING).to_pylist()],
                   np.float32)
    return t.column(schema.KEY).to_pylist(), vec


def test_our_own_embeddings_parquet_imports_without_shards(pipeline_run, tmp_path):
    out = tmp_path / "out"
    manifest = run(_config(out, import_embeddings={"path": str(pipeline_run["out"] / schema.EMBEDDINGS_DIR)}))
    keys, vec = _source(pipeline_run)
    ok = np.isfinite(vec).all(axis=1)
    stats = manifest["stages"]["import"]
    assert stats["samples"] == len(keys) and stats["invalid"] == int((~ok).sum()) > 0  # failed rows stay failed
    assert manifest["model_id"].startswith("imported:parquet:") and "write" not in manifest["stages"]
    scores = read_scores(out).to_pylist()
    assert sorted(r[schema.KEY] for r in scores) == sorted(keys)
    assert sum(r[schema.STATUS] == schema.STATUS_OK for r in scores) == int(ok.sum())
    c = manifest["counts"]
    assert c["kept"] + c["pruned"] == int(ok.sum()) and abs(c["kept"] - 0.5 * ok.sum()) <= 2
    imported = pq.read_table(out / schema.EMBEDDINGS_DIR)
    got = {k: v for k, v in zip(imported.column(schema.KEY).to_pylist(), imported.column(schema.EMBEDDING).to_pylist())}
    for k, v in zip(keys, vec):
        if np.isfinite(v).all():  # the same unit vectors, up to float16 rounding
            assert np.allclose(np.asarray(got[k], np.float32), v, atol=2e-3)
    assert pq.read_table(out / schema.EXPORT_IDS_DIR).num_rows == c["kept"]
    assert run(_config(out, import_embeddings={"path": str(pipeline_run["out"] / schema.EMBEDDINGS_DIR)})
               )["stages"]["import"]["reused"]


def test_clip_retrieval_layout_with_uids_to_a_datacomp_subset(pipeline_run, tmp_path):
    keys, vec = _source(pipeline_run)
    ok = np.isfinite(vec).all(axis=1)
    keys, vec = [k for k, good in zip(keys, ok) if good], vec[ok]
    root = tmp_path / "clip"
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    half = len(keys) // 2
    uids = [f"{i:032x}" for i in range(len(keys))]
    for part, (a, b) in enumerate(((0, half), (half, len(keys)))):
        np.save(root / "img_emb" / f"img_emb_{part}.npy", (vec[a:b] * 3.0).astype(np.float16))  # not unit norm
        pq.write_table(pa.table({"key": keys[a:b], "url": [f"https://x.invalid/{k}.jpg" for k in keys[a:b]],
                                 "caption": ["c"] * (b - a), "uid": uids[a:b]}), root / "metadata" / f"metadata_{part}.parquet")
    out = tmp_path / "out"
    manifest = run(_config(out, import_embeddings={"path": str(root), "format": "clip_retrieval"},
                           export={"id_col": "uid", "formats": ["parquet", "datacomp"]}))
    assert manifest["stages"]["import"]["parts"] == 2 and manifest["counts"]["input_samples"] == len(keys)
    kept = [r for r in read_scores(out).to_pylist() if r[schema.KEEP]]
    uid_of = dict(zip(keys, uids))
    subset = np.load(out / schema.EXPORT_DIR / DATACOMP_FILE)
    assert sorted((int(a) << 64) | int(b) for a, b in subset.tolist()) == sorted(int(uid_of[r[schema.KEY]], 16) for r in kept)
    rows = pq.read_table(out / schema.EXPORT_IDS_DIR).to_pylist()
    assert all(r["url"] == f"https://x.invalid/{r['key']}.jpg" for r in rows) and len(rows) == len(kept)


def test_a_run_without_tar_input_must_start_with_import_and_cannot_write(tmp_path):
    with pytest.raises(ConfigError, match="missing config key 'input'"):
        validate_config({"output": str(tmp_path)})
    with pytest.raises(ConfigError, match="'stages'.*the write stage reads tar shards"):
        validate_config({"output": str(tmp_path), "stages": ["import", "prototypes", "assign", "select", "write"],
                         "import_embeddings": {"path": str(tmp_path)}})
    with pytest.raises(ConfigError, match="missing config key 'import_embeddings.path'"):
        run(validate_config({"output": str(tmp_path / "o"), "stages": STAGES}))
