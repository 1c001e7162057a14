"""The import stage: precomputed embeddings (our own Parquet layout, clip-retrieval's npy +
metadata) start a run at prototypes, with no tar shards at all; scores and id exports work."""

from __future__ import annotations

import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import run
from pipelines.cli.config import validate_config
from prune import schema
from prune.io.exports import DATACOMP_FILE
from prune.io.key_ranges import KeyRanges, KeysSayNoShard
from prune.settings import ConfigError

from .conftest import read_scores, small_config

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


def test_clip_retrieval_parts_join_back_to_the_tar_shards_and_write_copies_them(pipeline_run, shards_dir, tmp_path):
    """With `input` too, rows from parts cut anyhow land in their own shard's embeddings file, in
    the tar's order; keys no part has fail with their reason; write copies the kept samples."""
    src = pq.read_table(pipeline_run["out"] / schema.EMBEDDINGS_DIR)
    keys, vec = _source(pipeline_run)
    ok = np.isfinite(vec).all(axis=1)
    rng = np.random.default_rng(0)
    rows = rng.permutation(np.flatnonzero(ok))  # across shards, in no shard's order
    dropped = {keys[i] for i in rows[:5]}
    rows = rows[5:]
    root = tmp_path / "clip"
    (root / "img_emb").mkdir(parents=True)
    (root / "text_emb").mkdir()
    (root / "metadata").mkdir()
    stray = ["zzzz-not-in-any-shard", "0"]  # in no shard's key range
    text = np.where(ok[:, None], vec, 0) + rng.normal(0, 1.0, vec.shape).astype(np.float32)  # the captions' vectors
    for part, chunk in enumerate(np.array_split(rows, 3)):
        part_keys = [keys[i] for i in chunk] + (stray if part == 1 else [])
        part_vec = np.concatenate([vec[chunk], np.ones((2 if part == 1 else 0, vec.shape[1]), np.float32)])
        np.save(root / "img_emb" / f"img_emb_{part}.npy", part_vec.astype(np.float16))
        part_text = np.concatenate([text[chunk], np.ones((2 if part == 1 else 0, vec.shape[1]), np.float32)])
        np.save(root / "text_emb" / f"text_emb_{part}.npy", part_text.astype(np.float16))
        pq.write_table(pa.table({"key": part_keys, "url": [f"https://x.invalid/{k}" for k in part_keys]}),
                       root / "metadata" / f"metadata_{part}.parquet")
    out = tmp_path / "out"
    cfg = small_config(shards_dir["dir"], out, stages=["import", "prototypes", "assign", "select", "write"],
                       import_embeddings={"path": str(root), "format": "clip_retrieval"})
    manifest = run(validate_config(cfg))
    stats = manifest["stages"]["import"]
    assert stats["joined"] and stats["unmatched"] == 2 and stats["missing"] >= len(dropped)
    got = pq.read_table(out / schema.EMBEDDINGS_DIR)
    # every shard the embed stage read: the same keys in the same order, the same vectors
    assert got.column(schema.KEY).to_pylist() == src.column(schema.KEY).to_pylist()
    assert got.column(schema.SHARD).to_pylist() == src.column(schema.SHARD).to_pylist()
    status = got.column(schema.STATUS).to_pylist()
    for k, s, s_src in zip(keys, status, src.column(schema.STATUS).to_pylist()):
        if k in dropped:
            assert s == schema.STATUS_NO_IMPORTED
        elif s_src == schema.STATUS_OK:
            assert s == schema.STATUS_OK
        else:  # failed in the embed stage: the tar's own reason, or no embedding was ever computed
            assert s in (s_src, schema.STATUS_NO_IMPORTED)
    emb = got.column(schema.EMBEDDING).to_pylist()
    score = got.column(schema.CLIP_SCORE).to_pylist()  # the captions' vectors followed their rows to the shards
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    for i in np.flatnonzero(ok):
        if keys[i] not in dropped:
            assert np.allclose(np.asarray(emb[i], np.float32), vec[i], atol=2e-3)
            expected = unit(vec[i].astype(np.float16).astype(np.float32)) @ unit(text[i].astype(np.float16).astype(np.float32))
            assert score[i] == pytest.approx(expected, abs=1e-4)
        else:
            assert score[i] is None
    c = manifest["counts"]
    assert c["input_samples"] == pipeline_run["manifest"]["counts"]["input_samples"]
    assert c["failed_by_reason"][schema.STATUS_NO_IMPORTED] == stats["missing"]
    assert c["shard_failures"] == pipeline_run["manifest"]["counts"]["shard_failures"]  # the same bad shards
    # the kept samples, copied from the tars
    kept = {r[schema.KEY] for r in read_scores(out).to_pylist() if r[schema.KEEP]}
    written = set()
    for tar in sorted((out / schema.PRUNED_DIR).glob("*.tar")):
        with tarfile.open(tar) as t:
            written |= {m.name.split(".", 1)[0] for m in t.getmembers()}
    assert written == kept and len(kept) == c["kept"] > 0
    assert (out / schema.IMPORTED_DIR).exists()  # url carried per input shard, for export
    assert not list((out / schema.STAGING_DIR).glob("import-*"))


def test_key_ranges_route_each_key_to_every_shard_whose_range_holds_it():
    ranges = KeyRanges.of({"00000": ("000000000", "000000009"), "00001": ("000010000", "000010009"),
                           "00004": ("000000000", "000000005")})  # a copy of part of shard 00000
    keys = ["000010003", "000000002", "zzz", "000000007", "0"]
    rows, shard = ranges.route(keys)
    pairs = sorted((keys[r], ranges.shards[s]) for r, s in zip(rows, shard))
    assert pairs == [("000000002", "00000"), ("000000002", "00004"), ("000000007", "00000"), ("000010003", "00001")]
    assert list(shard) == sorted(shard)  # grouped by shard: one row group each when staged
    # ids that say nothing of their shard (every range spans them all) are refused, not broadcast
    spread = KeyRanges.of({f"{i:05d}": ("a", "z") for i in range(10)})
    with pytest.raises(KeysSayNoShard, match="keys must say their shard"):
        spread.route(["b", "c", "d"])


def test_clip_retrievals_caption_embeddings_come_along_and_the_clip_score_stage_reads_them(pipeline_run, tmp_path):
    keys, vec = _source(pipeline_run)
    ok = np.isfinite(vec).all(axis=1)
    keys, vec = [k for k, good in zip(keys, ok) if good], vec[ok]
    rng = np.random.default_rng(1)
    text = (vec + rng.normal(0, 1.0, vec.shape)).astype(np.float32)  # captions that agree with their image, more or less
    text[:3] = np.nan  # no caption embedding for three samples (clip-retrieval writes NaN rows)
    root = tmp_path / "clip"
    for d in ("img_emb", "text_emb", "metadata"):
        (root / d).mkdir(parents=True)
    np.save(root / "img_emb" / "img_emb_0.npy", vec.astype(np.float16))
    np.save(root / "text_emb" / "text_emb_0.npy", text.astype(np.float16))
    pq.write_table(pa.table({"key": keys}), root / "metadata" / "metadata_0.parquet")
    out = tmp_path / "out"
    manifest = run(_config(out, stages=["import", "prototypes", "assign", "clip_score", "select"],
                           import_embeddings={"path": str(root), "format": "clip_retrieval"},
                           clip_score={"keep_top_fraction": 0.5}))
    assert manifest["stages"]["import"]["with_caption"] == len(keys) - 3
    got = pq.read_table(out / schema.EMBEDDINGS_DIR, columns=[schema.KEY, schema.CLIP_SCORE]).to_pylist()
    unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)  # noqa: E731
    expected = np.einsum("ij,ij->i", unit(vec.astype(np.float16).astype(np.float32)),
                         unit(text.astype(np.float16).astype(np.float32)))
    score = {r[schema.KEY]: r[schema.CLIP_SCORE] for r in got}
    assert [score[k] for k in keys[:3]] == [None] * 3
    np.testing.assert_allclose([score[k] for k in keys[3:]], expected[3:], atol=1e-5)
    c = manifest["counts"]
    n_scored = len(keys) - 3
    assert c["removed_by_reason"] == {schema.STATUS_LOW_ALIGNMENT: n_scored - int(np.floor(0.5 * n_scored + 0.5))}
