"""Prototype stage: fit spherical k-means on a sample, then assign every sample in parallel.

The fit sample is drawn per shard by tasks (each returns at most its share), so the driver
holds only the sample. Assignment is a Ray Data map over shards whose workers each hold the
centroids in a faiss index; each writes `scores/NNNNN.parquet` (cluster, distance) under a
temporary name. Selection columns are filled in later by the select stage.

With `kmeans.refine_iters > 0`, the sample fit only initializes a distributed Lloyd refinement
over every embedding (prune/lloyd.py): per iteration the centroids are put in the object store
once, each task reduces a fixed group of embeddings shards to per-cluster sums and counts, and
the driver folds the results (exactly, in any order) and updates the centroids.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from prune import lloyd, schema
from prune.config import KMeansConfig, RunConfig, fingerprint
from prune.kmeans import Assigner, default_k, fit_spherical_kmeans, prototype_distance
from prune.storage import OutputDir

from .embed_stage import embed_fingerprint
from .runtime import resolve, run_tasks, submit_bounded

log = logging.getLogger("ssl_prune")
# settings that only place work: the exact reduce makes the centroids independent of them
_PLACEMENT_ONLY = {"assign_concurrency", "refine_shards_per_task"}
def kmeans_settings(k: KMeansConfig) -> dict:
    """The k-means settings the centroids depend on.

    New settings left at their no-op values are left out, so runs made before they existed keep
    their fingerprint; `refine_tol` only counts when refinement is on.
    """
    s = k.model_dump(exclude=_PLACEMENT_ONLY)
    if not k.refine_iters:
        del s["refine_iters"], s["refine_tol"]
    if k.init == "random":
        del s["init"]
    if k.fit_num_cpus is None:  # a fit in a task runs faiss on that many threads
        del s["fit_num_cpus"]
    return s


def kmeans_fingerprint(cfg: RunConfig, shards: dict[str, str]) -> str:
    """Prototypes depend on the embeddings' settings, the k-means settings and which shards."""
    return fingerprint("kmeans", embed_fingerprint(cfg), kmeans_settings(cfg.kmeans), sorted(shards.items()))


def _read_embeddings(out: OutputDir, shard: str, columns=None) -> pa.Table:
    with out.open(schema.EMBEDDINGS_DIR, f"{shard}.parquet") as f:
        return pq.read_table(f, columns=columns)


def ok_matrix(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(mask of ok rows, float32 [n_ok, d]) from an embeddings table."""
    ok = np.asarray(table.column(schema.STATUS).to_numpy(zero_copy_only=False) == schema.STATUS_OK)
    col = table.column(schema.EMBEDDING).combine_chunks()
    dim = col.type.list_size
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    full = flat.reshape(-1, dim) if len(flat) else np.zeros((0, dim), np.float32)
    # flatten() skips null lists; failed rows are null, so `full` holds exactly the ok rows
    return ok, full


def count_ok(item: dict) -> dict:
    table = _read_embeddings(item["out"], item["shard"], columns=[schema.STATUS])
    st = table.column(schema.STATUS).to_numpy(zero_copy_only=False)
    return {"shard": item["shard"], "ok": int((st == schema.STATUS_OK).sum())}


def sample_shard(item: dict) -> tuple[str, np.ndarray]:
    """(shard, a seeded random subset of its ok embeddings, of the size asked for)."""
    _, x = ok_matrix(_read_embeddings(item["out"], item["shard"]))
    x = x[np.isfinite(x).all(axis=1)]  # a NaN row would poison the whole fit
    take = min(item["take"], len(x))
    rng = np.random.default_rng([item["seed"], int.from_bytes(item["shard"].encode()[-8:], "little")])
    idx = np.sort(rng.choice(len(x), size=take, replace=False)) if take < len(x) else np.arange(len(x))
    return item["shard"], x[idx]


def run_prototypes(cfg: RunConfig, out: OutputDir, shards: dict[str, str]) -> dict:
    """Fit (or reuse) the centroids; returns the k-means metadata."""
    fp = kmeans_fingerprint(cfg, shards)
    if out.exists(schema.PROTOTYPES_DIR, schema.KMEANS_META_FILE) and out.exists(
        schema.PROTOTYPES_DIR, schema.CENTROIDS_FILE
    ):
        meta = out.read_json(schema.PROTOTYPES_DIR, schema.KMEANS_META_FILE)
        if meta.get("fingerprint") == fp:
            return meta | {"reused": True}
    counts = {r["shard"]: r["ok"] for r in run_tasks(count_ok, [{"out": out, "shard": s} for s in shards], desc="prototypes: count")}
    n_ok = sum(counts.values())
    if n_ok == 0:
        raise RuntimeError("no sample could be embedded: nothing to cluster (see scores for reasons)")
    frac = min(1.0, cfg.kmeans.sample_size / n_ok)
    items = [
        {"out": out, "shard": s, "take": int(np.ceil(counts[s] * frac)), "seed": cfg.kmeans.seed}
        for s in sorted(shards) if counts[s]
    ]
    k = cfg.kmeans.k or default_k(n_ok)
    centroids, meta = fit_sample(cfg.kmeans, items, k)
    if cfg.kmeans.refine_iters:
        centroids, meta["refine"] = refine_all(
            cfg.kmeans, out, [s for s in sorted(shards) if counts[s]], centroids, block_rows=max(counts.values())
        )
        r = meta["refine"]
        meta["mean_distance_all"] = r["mean_distance_all"]
        meta["conventions"] = meta.get("conventions", {}) | {
            "mean_distance_all": "refinement: mean over all ok embeddings of (1 - cos) to the nearest centroid, "
            "of the centroids refine.final_objective_centroids names",
            "refine.final_objective": "refinement: sum over all ok embeddings of (1 - cos), lower is better "
            "(as refine.log[].objective; faiss's convention is n - this)",
        }
    meta |= {"fingerprint": fp, "n_ok_total": n_ok, "k_default_used": cfg.kmeans.k is None}
    # the metadata (with the fingerprint) is removed first and written last: a crash between
    # the two writes must not leave another run's metadata vouching for these centroids
    out.remove(schema.PROTOTYPES_DIR, schema.KMEANS_META_FILE)
    out.write_bytes(_npy_bytes(centroids), schema.PROTOTYPES_DIR, schema.CENTROIDS_FILE)
    out.write_json(meta, schema.PROTOTYPES_DIR, schema.KMEANS_META_FILE)
    return meta | {"reused": False}


def fit_sample(kc: KMeansConfig, items: list[dict], k: int) -> tuple[np.ndarray, dict]:
    """Draw the sample (one task per shard) and fit on it: on the driver, or in a Ray task with
    `fit_num_cpus` CPUs, whose sample never passes through the driver (it only holds refs)."""
    args = (k, kc.sample_size, kc.niter, kc.nredo, kc.seed, kc.init)
    if kc.fit_num_cpus is None:
        parts = dict(run_tasks(sample_shard, items, desc="prototypes: sample"))
        return _fit_parts([parts[s] for s in sorted(parts)], *args)
    check_fit_cpus(kc.fit_num_cpus)
    refs = submit_bounded(sample_shard, items)  # items are in shard order, so are the refs
    ray.wait(refs, num_returns=len(refs), fetch_local=False)  # the fit's CPUs are not held while sampling
    fit = ray.remote(num_cpus=kc.fit_num_cpus)(_fit_in_task)
    return ray.get(fit.remote(refs, kc.fit_num_cpus, *args))


def _largest_live_node(resource: str) -> float:
    return max((n["Resources"].get(resource, 0) for n in ray.nodes() if n["Alive"]), default=0)


def check_fit_cpus(num_cpus: int) -> bool:
    """Warn when no live node has `num_cpus` CPUs: on an autoscaling cluster the node may not be
    launched yet, so this is no error, but on a fixed cluster the fit would wait forever.
    -> True when some live node is big enough."""
    largest = _largest_live_node("CPU")
    if num_cpus <= largest:
        return True
    log.warning(
        "kmeans.fit_num_cpus=%d but the largest live node has %g CPUs: the sample fit task waits for a node "
        "with %d CPUs (an autoscaler may launch one; on a fixed cluster lower kmeans.fit_num_cpus)",
        num_cpus, largest, num_cpus,
    )
    return False


def _fit_parts(parts: list[np.ndarray], k, sample_size, niter, nredo, seed, init) -> tuple[np.ndarray, dict]:
    sample = np.concatenate(parts)[:sample_size]
    return fit_spherical_kmeans(sample, k, niter, nredo, seed, init=init)


def _fit_in_task(refs: list, threads: int, *args) -> tuple[np.ndarray, dict]:
    import faiss

    faiss.omp_set_num_threads(threads)
    parts = [x for _, x in ray.get(refs)]
    return _fit_parts(parts, *args)


# rows of the largest embeddings shard when the caller does not know them: img2dataset's default
# shard size (LAION's shards hold ~10,000 samples)
DEFAULT_BLOCK_ROWS = 10_000


def refine_memory(k: int, d: int, block_rows: int | None = None) -> int:
    """The Ray `memory=` reservation (bytes) of one refine task: see `lloyd.task_memory_bytes`."""
    return lloyd.task_memory_bytes(k, d, DEFAULT_BLOCK_ROWS if block_rows is None else block_rows)


def refine_all(
    kc: KMeansConfig, out: OutputDir, shards: list[str], centroids: np.ndarray, on_iteration=None,
    block_rows: int | None = None,
) -> tuple[np.ndarray, dict]:
    """Distributed Lloyd over every ok embedding of `shards` (sorted), from the sample fit's centroids.

    `on_iteration(log_entry)` is called after each update (progress, benchmarks). `block_rows`: the
    ok rows of the largest shard (default `DEFAULT_BLOCK_ROWS`), for the tasks' memory reservation."""
    g = kc.refine_shards_per_task
    blocks = list(enumerate(shards))  # block id = position in shard order: the candidates' tie-break
    groups = [blocks[i : i + g] for i in range(0, len(blocks), g)]
    memory = refine_memory(*centroids.shape, block_rows)
    largest = _largest_live_node("memory")
    if memory > largest:
        log.warning(
            "refine tasks reserve %.2f GB of memory (k=%d, d=%d) but the largest live node offers %.2f GB: "
            "they wait for a larger node (autoscaler); on a fixed cluster lower kmeans.k",
            memory / 1e9, *centroids.shape, largest / 1e9,
        )

    passes = itertools.count(1)

    def map_blocks(c: np.ndarray):
        ref = ray.put(c)  # shipped once per iteration, shared by every task
        items = [{"out": out, "blocks": grp, "centroids": ref} for grp in groups]
        return run_tasks(
            refine_blocks, items, desc=f"prototypes: refine {next(passes)}/{kc.refine_iters}", memory=memory
        )

    centroids, meta = lloyd.refine(centroids, map_blocks, kc.refine_iters, kc.refine_tol, on_iteration)
    return centroids, meta | {"shards_per_task": g, "tasks_per_iteration": len(groups), "task_memory_bytes": memory}


def refine_blocks(item: dict) -> lloyd.BlockStats:
    """One task: its shards' block statistics, folded in place into the first block's. Holds the
    centroids (and their faiss index), one shard's embeddings at a time, the running sums and one
    block's: memory `lloyd.task_memory_bytes`, reserved by `refine_all`."""
    c = resolve(item["centroids"])
    index = lloyd.centroid_index(c)
    total = None
    for block_id, shard in item["blocks"]:
        _, x = ok_matrix(_read_embeddings(item["out"], shard, columns=[schema.STATUS, schema.EMBEDDING]))
        x = x[np.isfinite(x).all(axis=1)]  # as the sample: a NaN row has no nearest centroid
        part = lloyd.block_stats(x, c, block_id=block_id, index=index)
        del x
        # block_stats returns fresh arrays, owned here: the total is added into without a copy
        total = part if total is None else lloyd.combine(total, part, inplace=True)
        del part
    return total if total is not None else lloyd.empty_stats(*c.shape)


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    b = io.BytesIO()
    np.save(b, arr)
    return b.getvalue()


def load_centroids(out: OutputDir) -> np.ndarray:
    with out.open(schema.PROTOTYPES_DIR, schema.CENTROIDS_FILE) as f:
        return np.load(f)


class AssignShards:
    """Ray Data worker: holds the centroids; per shard, writes the assignment scores file."""

    def __init__(self, out: OutputDir, centroids: np.ndarray, fp: str):
        self.out = out  # the OutputDir itself: it pickles with its storage options (a URL would not)
        self.assigner = Assigner(centroids)
        self.fp = fp

    def __call__(self, batch: dict) -> dict:
        results = [self.assign_one(str(s)) for s in batch[schema.SHARD]]
        return {k: np.array([r[k] for r in results]) for k in ("shard", "rows", "reused")}

    def assign_one(self, shard: str) -> dict:
        name = f"{shard}.parquet"
        if self.out.exists(schema.SCORES_DIR, name):
            with self.out.open(schema.SCORES_DIR, name) as f:
                md = pq.read_schema(f).metadata or {}
            if md.get(schema.META_ASSIGN_FINGERPRINT, b"").decode() == self.fp:
                return {"shard": shard, "rows": -1, "reused": True}
        table = _read_embeddings(self.out, shard)
        ok, x = ok_matrix(table)
        n = len(table)
        cluster = np.full(n, -1, np.int32)
        distance = np.full(n, np.nan, np.float32)
        ids, sims = self.assigner(x)
        cluster[ok], distance[ok] = ids, prototype_distance(sims)
        invalid = np.zeros(n, bool)
        invalid[ok] = (ids < 0) | ~np.isfinite(sims) | ~np.isfinite(x).all(axis=1)
        if invalid.any():  # a model that produced NaN/inf: record it, never score it
            ok = ok & ~invalid
            cluster[invalid], distance[invalid] = -1, np.nan
            status = np.asarray(table.column(schema.STATUS).to_pylist(), dtype=object)
            status[invalid] = schema.STATUS_BAD_EMBEDDING
            table = table.set_column(table.schema.get_field_index(schema.STATUS), schema.STATUS, pa.array(status, pa.string()))
        src_meta = table.schema.metadata or {}
        meta = {schema.META_ASSIGN_FINGERPRINT: self.fp.encode()}
        if schema.META_SHARD_ERROR in src_meta:
            meta[schema.META_SHARD_ERROR] = src_meta[schema.META_SHARD_ERROR]
        scores = empty_selection(table, cluster, distance, ok).replace_schema_metadata(meta)
        with self.out.open_atomic(schema.SCORES_DIR, name) as f:
            pq.write_table(scores, f)
        return {"shard": shard, "rows": n, "reused": False}




def empty_selection(table: pa.Table, cluster, distance, ok) -> pa.Table:
    """A scores table with assignment filled in and the selection columns not yet decided."""
    n = len(table)
    return pa.table(
        {
            schema.KEY: table.column(schema.KEY),
            schema.SHARD: table.column(schema.SHARD),
            schema.STATUS: table.column(schema.STATUS),
            schema.CLUSTER: pa.array(cluster, pa.int32()),
            schema.DISTANCE: pa.array(distance, pa.float32(), mask=~ok),
            schema.PRIORITY: pa.array(np.zeros(n, np.uint64), pa.uint64()),
            schema.PERCENTILE: pa.nulls(n, pa.float64()),
            schema.KEEP: pa.array(np.zeros(n, bool)),
            schema.BAND: pa.array(np.full(n, -1, np.int32)),
        },
        schema=schema.SCORES_SCHEMA,
    )


def run_assign(cfg: RunConfig, out: OutputDir, shards: dict[str, str]) -> dict:
    fp = kmeans_fingerprint(cfg, shards)
    centroids = load_centroids(out)
    ds = ray.data.from_items([{schema.SHARD: s} for s in sorted(shards)], override_num_blocks=max(1, len(shards)))
    ds = ds.map_batches(
        AssignShards, fn_constructor_args=(out, centroids, fp),
        batch_size=1, num_cpus=1, compute=ray.data.ActorPoolStrategy(size=cfg.kmeans.assign_concurrency),
    )
    assigned = reused = 0
    for row in ds.iter_rows():
        reused += int(row["reused"])
        assigned += int(not row["reused"])
    return {"shards_assigned": assigned, "shards_reused": reused, "fingerprint": fp}
