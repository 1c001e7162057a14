"""Object storage: the whole pipeline with input and output on s3://, against moto's S3 server.

A module-scoped moto server on loopback stands in for S3 (tests/s3_server.py). The standard
AWS variables point clients at it; the session's Ray is started for this module with the same
variables in its `runtime_env` (under conftest's `own_ray_module`), so every worker reaches the
same server, and the plain session Ray is back afterwards for the tests that follow.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
import textwrap

import boto3
import moto  # noqa: F401  (tests/s3_server.py runs its server)
import pyarrow.parquet as pq
import pytest
import ray
import s3fs

from pipelines.cli.config import validate_config
from pipelines.report import REPORT_FILE
from prune import schema
from prune.io.shards import iter_tar_samples, read_shard
from prune.io.storage import OutputDir, StoreError, list_input_shards
from prune.io.tar_index_cache import load_index
from prune.io.tar_spans import tar_index

from .conftest import REPO, small_config, start_session_ray
from .s3_server import s3_with_bucket

BUCKET = "ssl-prune-test"


@pytest.fixture(scope="module")
def s3():
    """A running S3 server with one bucket; AWS_* variables point this process at it."""
    with s3_with_bucket(BUCKET) as (server, fs):
        yield {"server": server, "fs": fs, "client": boto3.client("s3")}


@pytest.fixture(scope="module")
def s3_ray(s3, own_ray_module):
    """The session's Ray, its workers seeing the S3 variables, for the rest of the module."""
    start_session_ray(runtime_env={"env_vars": dict(s3["server"].env)})
    assert ray.get_runtime_context().runtime_env.env_vars() == s3["server"].env


def keys(s3, prefix: str) -> list[str]:
    """Every object key under a prefix, straight from the server (no listing cache)."""
    pages = s3["client"].get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def open_uploads(s3) -> list:
    return s3["client"].list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])


# --- OutputDir on S3 ---------------------------------------------------------------------------


def test_output_dir_on_s3(s3):
    out = OutputDir(f"s3://{BUCKET}/storage/basic/")
    assert not out.rename_is_atomic  # object store: one upload is atomic, there is no rename
    out.makedirs()  # no directories on S3: only checks the bucket
    out.makedirs("a", "b")
    assert keys(s3, "storage/basic/") == []
    out.write_bytes(b"abc", "scores", "00000.parquet")
    out.write_json({"b": 1}, "manifest.json")
    assert out.read_json("manifest.json") == {"b": 1}
    assert out.exists("scores") and out.exists("scores", "00000.parquet")  # a prefix "exists"
    assert not out.exists("nothing")
    assert out.listdir() == ["manifest.json", "scores"]
    assert out.listdir("nothing") == []
    assert out.url_of("scores", "00000.parquet") == f"s3://{BUCKET}/storage/basic/scores/00000.parquet"
    clone = pickle.loads(pickle.dumps(out))  # as a Ray worker gets it
    assert clone.url == out.url and clone.root == out.root and not clone.rename_is_atomic
    with clone.open("scores", "00000.parquet") as f:
        assert f.read() == b"abc"
    out.remove("scores")  # a prefix: every object under it
    out.remove("scores")  # absent: no error
    assert keys(s3, "storage/basic/") == ["storage/basic/manifest.json"]
    assert out.listdir() == ["manifest.json"]


def test_no_bucket_is_a_clear_error(s3):
    with pytest.raises(FileNotFoundError, match="bucket"):
        OutputDir("s3://no-such-bucket-here/run").makedirs()


def test_listing_sees_writes_of_other_clients(s3):
    """A worker's write must show in the driver's next listing (s3fs caches listings)."""
    out = OutputDir(f"s3://{BUCKET}/storage/listing")
    out.write_bytes(b"1", "pruned", "00000.tar")
    assert out.listdir("pruned") == ["00000.tar"]
    other = s3fs.S3FileSystem(skip_instance_cache=True)  # another process, in effect
    other.pipe(f"{BUCKET}/storage/listing/pruned/00001.tar", b"2")
    assert out.listdir("pruned") == ["00000.tar", "00001.tar"]
    assert out.exists("pruned", "00001.tar")
    other.rm(f"{BUCKET}/storage/listing/pruned/00000.tar")
    assert out.listdir("pruned") == ["00001.tar"]
    assert out.find() == ["pruned/00001.tar"]


def test_open_atomic_writes_the_final_key_only(s3):
    out = OutputDir(f"s3://{BUCKET}/storage/direct")
    with out.open_atomic("embeddings", "00000.parquet") as f:
        f.write(b"partial")
        assert keys(s3, "storage/direct/") == []  # nothing visible before the upload completes
    assert keys(s3, "storage/direct/") == ["storage/direct/embeddings/00000.parquet"]
    with out.open("embeddings", "00000.parquet") as f:
        assert f.read() == b"partial"


@pytest.mark.parametrize("size", [1000, 6 * 2**20], ids=["single-put", "multipart"])
def test_open_atomic_failure_leaves_no_object(s3, size):
    """A failure mid-write aborts the upload: no object, no multipart upload left open."""
    # 5 MiB blocks: 6 MiB of data sends a first part before the failure
    out = OutputDir(f"s3://{BUCKET}/storage/fail-{size}", default_block_size=5 * 2**20)
    with pytest.raises(RuntimeError, match="boom"):
        with out.open_atomic("scores", "00000.parquet") as f:
            f.write(b"x" * size)
            f.flush()
            raise RuntimeError("boom")
    assert keys(s3, f"storage/fail-{size}/") == []
    assert not out.exists("scores", "00000.parquet")
    assert open_uploads(s3) == []


def test_open_atomic_failure_keeps_the_previous_version(s3):
    out = OutputDir(f"s3://{BUCKET}/storage/previous", default_block_size=5 * 2**20)
    out.write_bytes(b"version 1", "manifest.json")
    for data in (b"version 2, cut", b"y" * (6 * 2**20)):
        with pytest.raises(KeyboardInterrupt):  # BaseException too: a worker interrupted mid-write
            with out.open_atomic("manifest.json") as f:
                f.write(data)
                f.flush()
                raise KeyboardInterrupt
    assert keys(s3, "storage/previous/") == ["storage/previous/manifest.json"]
    with out.open("manifest.json") as f:
        assert f.read() == b"version 1"
    assert open_uploads(s3) == []


def test_killed_writer_leaves_no_object(s3):
    """A process killed mid-write (no handler runs) never completes its upload."""
    code = textwrap.dedent(
        f"""
        import os
        from prune.io.storage import OutputDir
        out = OutputDir("s3://{BUCKET}/storage/killed", default_block_size=5 * 2**20)
        with out.open_atomic("pruned", "00000.tar") as f:
            f.write(b"z" * (6 * 2**20))
            f.flush()  # the first part is on the server
            os._exit(9)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO)
    assert proc.returncode == 9
    assert keys(s3, "storage/killed/") == []
    # the started upload stays invisible until aborted (a bucket lifecycle rule does that on S3)
    for up in open_uploads(s3):
        s3["client"].abort_multipart_upload(Bucket=BUCKET, Key=up["Key"], UploadId=up["UploadId"])


# --- inputs on S3 -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_input(s3, shards_dir):
    """The real Fashion-MNIST shards, good and bad, with their sidecar files, under s3://.../in/."""
    names = sorted(os.listdir(shards_dir["dir"]))
    for name in names:
        s3["fs"].put_file(str(shards_dir["dir"] / name), f"{BUCKET}/in/{name}")
    return {"url": f"s3://{BUCKET}/in", "names": names}


def test_list_input_shards_on_s3(s3, s3_input):
    tars = [n for n in s3_input["names"] if n.endswith(".tar")]
    every = [f"s3://{BUCKET}/in/{n}" for n in tars]
    assert list_input_shards(s3_input["url"]) == every
    assert list_input_shards(s3_input["url"] + "/") == every
    assert list_input_shards(f"s3://{BUCKET}/in/*.tar") == every
    assert list_input_shards(f"s3://{BUCKET}/in/{{00000..00001}}.tar") == every[:2]
    assert list_input_shards(f"s3://{BUCKET}/in/{{00000..00099}}.tar") == every  # missing names left out
    assert list_input_shards(f"s3://{BUCKET}/in/00002.tar") == [every[2]]


# --- the whole pipeline on S3 -------------------------------------------------------------------


def _members(tar_bytes: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


@pytest.fixture(scope="module")
def s3_run(s3, s3_ray, s3_input):
    from pipelines.cli import run

    cfg = validate_config(small_config(s3_input["url"], f"s3://{BUCKET}/out"))
    return {"cfg": cfg, "manifest": run(cfg), "out": OutputDir(f"s3://{BUCKET}/out")}


def test_pipeline_on_s3(s3, s3_run, shards_dir):
    out: OutputDir = s3_run["out"]
    assert "out/manifest.json" in keys(s3, "out/")
    manifest = out.read_json(schema.MANIFEST)
    assert manifest["counts"] == s3_run["manifest"]["counts"]
    c = manifest["counts"]
    assert c["input_samples"] == c["kept"] + c["pruned"] + c["failed"]
    assert c["kept"] > 0 and c["pruned"] > 0 and c["failed"] > 0  # the bad shards are counted
    assert set(c["shard_failures"]) >= {shards_dir["bad"]["empty"]["shard"]}

    # every kept sample's members are byte-identical to the input's
    source: dict[str, list[bytes]] = {}
    for p in sorted(shards_dir["dir"].glob("*.tar")):  # good shards and the readable part of bad ones
        with open(p, "rb") as f:
            with contextlib.suppress(tarfile.ReadError):
                for sample in iter_tar_samples(f):
                    for info, data in sample.members:
                        source.setdefault(info.name, []).append(data)
    sizes = out.read_json(schema.PRUNED_DIR, schema.SIZES_FILE)
    written = 0
    for name, count in sizes.items():
        with out.open(schema.PRUNED_DIR, name) as f:
            members = _members(f.read())
        assert members and all(data in source[m] for m, data in members.items())
        assert len({m.split(".", 1)[0] for m in members}) == count
        written += count
    assert written == c["kept"]

    # embeddings and scores: one readable parquet per input shard, every sample accounted for
    shards = sorted(n[: -len(".parquet")] for n in out.listdir(schema.EMBEDDINGS_DIR))
    assert len(shards) == c["input_shards"]
    rows = 0
    for s in shards:
        with out.open(schema.EMBEDDINGS_DIR, f"{s}.parquet") as f:
            emb = pq.read_table(f)
        with out.open(schema.SCORES_DIR, f"{s}.parquet") as f:
            scores = pq.read_table(f)
        assert emb.column(schema.KEY).to_pylist() == scores.column(schema.KEY).to_pylist()
        rows += len(scores)
    assert rows == c["input_samples"]
    assert sum(1 for s in manifest["outputs"] if s.startswith(f"{schema.PRUNED_DIR}/") and s.endswith(".tar")) == c["output_shards"]

    # the embed stage's reads left each readable tar's index, stamped with the object's ETag: the
    # write stage read it instead of walking the tar's headers over S3
    indexed = 0
    for p in sorted(shards_dir["dir"].glob("*.tar")):
        index = load_index(out, schema.shard_id_of(str(p)), f"s3://{BUCKET}/in/{p.name}")
        assert (index is None) == bool(read_shard(str(p), list(schema.IMAGE_EXTENSIONS_DEFAULT)).shard_error), p.name
        if index is not None:
            with open(p, "rb") as f:
                assert index.samples() == tar_index(f).samples()
            indexed += 1
    assert indexed > 0

    # nothing temporary left: no staging prefix, no hidden temporaries, no open uploads
    every = keys(s3, "out/")
    assert not [k for k in every if "/_staging" in k or "/.tmp-" in k or "/." in k]
    assert open_uploads(s3) == []


def test_rerun_on_s3_reuses_every_stage(s3, s3_run):
    from pipelines.cli import run

    views = (schema.MANIFEST, REPORT_FILE)  # each run's record and its picture: rewritten by every run
    before = {k: s3["fs"].info(f"{BUCKET}/{k}")["ETag"] for k in keys(s3, "out/") if not k.endswith(views)}
    manifest = run(s3_run["cfg"])
    st = manifest["stages"]
    assert st["embed"]["shards_embedded"] == 0 and st["embed"]["shards_reused"] == st["embed"]["shards_total"]
    assert st["prototypes"]["reused"]
    assert st["assign"]["shards_assigned"] == 0
    assert st["write"]["reused"]
    assert manifest["counts"] == s3_run["manifest"]["counts"]
    after = {k: s3["fs"].info(f"{BUCKET}/{k}")["ETag"] for k in keys(s3, "out/") if not k.endswith(views)}
    assert after == before  # not one object rewritten


# --- retried tasks: outputs are idempotent ------------------------------------------------------


def _etags(s3, prefix: str) -> dict[str, str]:
    return {k: s3["client"].head_object(Bucket=BUCKET, Key=k)["ETag"] for k in keys(s3, prefix)}


def test_retried_write_tasks_rewrite_identical_objects(s3, s3_run):
    """A retried fragment or output task (a node lost mid-run) writes the very same bytes."""
    from pipelines.inputs import resolve_shards
    from pipelines.stages.write import (
        FragmentTask,
        OutputTask,
        fragment_task,
        output_task,
    )
    from prune.io.writer import plan_output_shards

    out: OutputDir = s3_run["out"]
    shards = resolve_shards(s3_run["cfg"].input)
    staging = f"{schema.STAGING_DIR}/retry-test"
    items = [FragmentTask(out, s, shards[s], staging) for s in sorted(shards)]
    first = [fragment_task(i) for i in items]
    before = _etags(s3, f"out/{staging}/")
    out.remove(staging, "done")  # as if every task died after its fragments, before its record
    second = [fragment_task(i) for i in items]
    assert second == first and _etags(s3, f"out/{staging}/") == before

    counts = {(int(b), r["shard"]): n for r in first for b, n in r["counts"].items()}
    plans = plan_output_shards(counts, s3_run["cfg"].write.samples_per_shard)
    sizes = out.read_json(schema.PRUNED_DIR, schema.SIZES_FILE)
    assert {p.name: p.count for p in plans} == sizes  # the same plan as the run's
    published = _etags(s3, f"out/{schema.PRUNED_DIR}/")
    for plan in plans[:2]:  # the task died after the tar was complete: skipped
        assert output_task(OutputTask(out, plan, staging)).count == plan.count
    out.remove(schema.PRUNED_DIR, plans[0].name)  # ... or before: written again, identically
    output_task(OutputTask(out, plans[0], staging))
    assert _etags(s3, f"out/{schema.PRUNED_DIR}/") == published
    out.remove(staging)


def test_finalize_counts_rows_written_twice_once(s3, s3_run):
    """Staged rows of a retried embed write (twice, or cut short) give each sample once."""
    import pyarrow as pa

    from pipelines.decoding import COUNT, POS
    from pipelines.embed_staging import Finalized, FinalizeTask, finalize_shard

    src: OutputDir = s3_run["out"]
    shard = sorted(n[: -len(".parquet")] for n in src.listdir(schema.EMBEDDINGS_DIR))[0]
    with src.open(schema.EMBEDDINGS_DIR, f"{shard}.parquet") as f:
        final = pq.read_table(f)
    n = len(final)
    staged = final.drop_columns([schema.SHARD]).append_column(POS, pa.array(range(n), pa.int64()))
    staged = staged.append_column(COUNT, pa.array([n] * n, pa.int64()))
    out = OutputDir(f"s3://{BUCKET}/retry-embed")
    part = f"{schema.STAGING_DIR}/embed-x/{schema.SHARD}={shard}"
    for name, table in (("a_000000-0.parquet", staged), ("a_000001-0.parquet", staged.slice(n // 2)),
                        ("a_000002-0.parquet", staged.slice(0, 3))):
        with out.open_atomic(part, name) as f:
            pq.write_table(table, f)
    out.write_bytes(b"PAR1 cut short", part, "a_000003-0.parquet")  # not valid parquet: skipped
    item = FinalizeTask(out, shard, "s3://x/y.tar", part, "fp", "m")
    assert finalize_shard(item) == Finalized(shard, True, n)
    with out.open(schema.EMBEDDINGS_DIR, f"{shard}.parquet") as f:
        again = pq.read_table(f)
    assert again.column(schema.KEY).equals(final.column(schema.KEY))
    assert again.column(schema.EMBEDDING).equals(final.column(schema.EMBEDDING))
    assert finalize_shard(item).rows == -1  # a retry after it finished: nothing rewritten
    out.remove(part)
    with out.open_atomic(part, "a_000000-0.parquet") as f:  # a sample missing: refused
        pq.write_table(staged.slice(1), f)
    out.remove(schema.EMBEDDINGS_DIR)
    res = finalize_shard(item)
    assert not res.ok and f"{n - 1} of {n}" in res.why
    out.remove("")


def test_a_worker_that_cannot_reach_the_output_fails_early(s3, s3_ray, s3_input):
    from pipelines.inputs import check_worker_storage

    check_worker_storage(OutputDir(f"s3://{BUCKET}/out"), f"{s3_input['url']}/00000.tar")
    # a user's to fix: StoreError, which the CLI prints as one line with exit status 2
    with pytest.raises(StoreError, match="AWS_ENDPOINT_URL"):
        check_worker_storage(OutputDir("s3://no-such-bucket-here/out"), f"{s3_input['url']}/00000.tar")
    with pytest.raises(StoreError, match="cannot reach the input"):
        check_worker_storage(OutputDir(f"s3://{BUCKET}/out"), f"{s3_input['url']}/99999.tar")
