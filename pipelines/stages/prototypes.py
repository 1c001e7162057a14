"""Prototypes stage: spherical k-means fitted on a sample, optionally refined over every embedding.

The fit sample is drawn per shard by tasks (each returns at most its share), so the driver holds
only the sample; with `kmeans.fit_num_cpus` the fit itself runs in a Ray task and the sample
never reaches the driver. With `kmeans.refine_iters > 0` the sample fit only initializes
distributed Lloyd passes (prune/cluster/lloyd.py): per pass the centroids are put in the object
store once, each task reduces a fixed group of embeddings shards to per-cluster sums and counts,
and the driver folds them (exactly, in any order). Writes `prototypes/centroids.npy` and
`kmeans.json`; complete when `kmeans.json` carries this fingerprint.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import ray

from prune import schema
from prune.cluster import lloyd, prototypes
from prune.cluster.kmeans import l2_normalize
from prune.cluster.settings import KMeansConfig
from prune.io.storage import OutputDir
from prune.io.tables import npy_bytes, ok_matrix, read_embeddings

from ..runtime import map_reduce, resolve, run_batched, submit_bounded
from ..stage import STAGES, Context, Stage

log = logging.getLogger("ssl_prune")

# rows of the largest embeddings shard when the caller does not know them: img2dataset's default
# shard size (LAION's shards hold ~10,000 samples)
DEFAULT_BLOCK_ROWS = 10_000


@dataclass
class PrototypesStats:
    k: int
    n_ok_total: int
    kmeans: dict  # prototypes/kmeans.json: the fit's settings, objective, refinement log


@dataclass(frozen=True)
class ShardTask:
    out: OutputDir
    shard: str


@dataclass(frozen=True)
class SampleTask:
    out: OutputDir
    shard: str
    take: int  # embeddings to draw from this shard
    seed: int


def count_ok(task: ShardTask) -> tuple[str, int]:
    st = read_embeddings(task.out, task.shard, columns=[schema.STATUS]).column(schema.STATUS).to_numpy(zero_copy_only=False)
    return task.shard, int((st == schema.STATUS_OK).sum())


def sample_shard(task: SampleTask) -> tuple[str, np.ndarray]:
    """(shard, a seeded random subset of its ok embeddings, of the size asked for)."""
    _, x = ok_matrix(read_embeddings(task.out, task.shard))
    return task.shard, prototypes.sample_block(x, task.take, task.seed, task.shard)


def fit_sample(kc: KMeansConfig, tasks: list[SampleTask], k: int) -> tuple[np.ndarray, dict]:
    """Draw the sample (one task per shard) and fit on it: on the driver, or in a Ray task with
    `fit_num_cpus` CPUs, whose sample never passes through the driver (it only holds refs)."""
    if kc.fit_num_cpus is None:
        parts = dict(run_batched(sample_shard, tasks, desc="prototypes: sample"))
        return prototypes.fit_sample(np.concatenate([parts[s] for s in sorted(parts)]), kc, k)
    check_fit_cpus(kc.fit_num_cpus)
    refs = submit_bounded(sample_shard, tasks)  # tasks are in shard order, so are the refs
    ray.wait(refs, num_returns=len(refs), fetch_local=False)  # the fit's CPUs are not held while sampling
    fit = ray.remote(num_cpus=kc.fit_num_cpus)(_fit_in_task)
    return ray.get(fit.remote(refs, kc, k))


def _fit_in_task(refs: list, kc: KMeansConfig, k: int) -> tuple[np.ndarray, dict]:
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(kc.fit_num_cpus)
    try:
        return prototypes.fit_sample(np.concatenate([x for _, x in ray.get(refs)]), kc, k)
    finally:  # Ray reuses this worker process for 1-CPU tasks (refine, assign): not with fit_num_cpus threads
        faiss.omp_set_num_threads(before)


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


def refine_memory(k: int, d: int, block_rows: int | None = None) -> int:
    """The Ray `memory=` reservation (bytes) of one refine task: see `lloyd.task_memory_bytes`."""
    return lloyd.task_memory_bytes(k, d, DEFAULT_BLOCK_ROWS if block_rows is None else block_rows)


REDUCE_FAN_IN = 8  # refine results one reduce task folds (each holds a k x d int64 total and one part)
CACHE_SHARE = 0.25  # refine_cache=None: cache when the float32 blocks fit in this share of the object store


@dataclass(frozen=True)
class RefineTask:
    out: OutputDir
    blocks: list  # (block id, shard) pairs: the block id is the shard's position, the candidates' tie-break
    centroids: object  # an ObjectRef shared by every task of the pass (or the array itself)
    cached: object = None  # an ObjectRef of `load_blocks`' output for these blocks; None: read Parquet


def load_block(out: OutputDir, shard: str) -> np.ndarray:
    """One shard's ok, finite embeddings as float32 (NaN rows have no nearest centroid, as in the sample)."""
    _, x = ok_matrix(read_embeddings(out, shard, columns=[schema.STATUS, schema.EMBEDDING]))
    return x[np.isfinite(x).all(axis=1)]


def load_blocks(task: RefineTask) -> list:
    """A refine task's blocks, read once, normalized once, and kept in the object store for every pass."""
    return [l2_normalize(load_block(task.out, shard)) for _, shard in task.blocks]


def use_cache(kc: KMeansConfig, n_rows: int, d: int) -> bool:
    if kc.refine_cache is not None:
        return kc.refine_cache
    store = ray.cluster_resources().get("object_store_memory", 0)
    return n_rows * d * 4 <= CACHE_SHARE * store


def refine_all(
    kc: KMeansConfig, out: OutputDir, shards: list[str], centroids: np.ndarray, meta: dict,
    on_iteration=None, block_rows: int | None = None, n_rows: int | None = None,
) -> tuple[np.ndarray, dict]:
    """Distributed Lloyd over every ok embedding of `shards` (sorted), from the sample fit's centroids.

    `on_iteration(log_entry)` is called after each update (progress, benchmarks). `block_rows`: the
    ok rows of the largest shard (default `DEFAULT_BLOCK_ROWS`), for the tasks' memory reservation;
    `n_rows`: all ok rows, to decide whether the blocks stay cached (`kmeans.refine_cache`)."""
    g = kc.refine_shards_per_task
    blocks = list(enumerate(shards))
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
    cached = [None] * len(groups)
    if use_cache(kc, n_rows if n_rows is not None else len(shards) * DEFAULT_BLOCK_ROWS, centroids.shape[1]):
        # read once: later passes take the float32 blocks from the object store, zero-copy (a block
        # lost with its node is rebuilt by Ray from the task that made it)
        cached = submit_bounded(load_blocks, [RefineTask(out, grp, None) for grp in groups])
    meta = meta | {"refine_cache": any(c is not None for c in cached)}

    def map_blocks(c: np.ndarray):
        ref = ray.put(c)  # shipped once per iteration, shared by every task
        tasks = [RefineTask(out, grp, ref, cache) for grp, cache in zip(groups, cached)]
        # the k x d sums are folded in tasks: one result per pass reaches the driver, whatever the
        # number of tasks (exact fixed-point sums: the same centroids in any grouping)
        total = map_reduce(refine_blocks, tasks, lloyd.reduce_stats, fan_in=REDUCE_FAN_IN,
                           desc=f"prototypes: refine {next(passes)}/{kc.refine_iters}", memory=memory)
        return [total]

    return prototypes.refine(kc, centroids, meta, map_blocks, on_iteration, shards_per_task=g,
                             tasks_per_iteration=len(groups), task_memory_bytes=memory)


def refine_blocks(task: RefineTask) -> lloyd.BlockStats:
    """One task: its shards' block statistics, folded in place into the first block's. Holds the
    centroids (and their faiss index), one shard's embeddings at a time, the running sums and one
    block's: memory `lloyd.task_memory_bytes`, reserved by `refine_all`."""
    c = resolve(task.centroids)
    index = lloyd.centroid_index(c)
    total = None
    blocks = resolve(task.cached) if task.cached is not None else None
    for i, (block_id, shard) in enumerate(task.blocks):
        x = blocks[i] if blocks is not None else load_block(task.out, shard)
        part = lloyd.block_stats(x, c, block_id=block_id, index=index, normalized=blocks is not None)
        del x
        # block_stats returns fresh arrays, owned here: the total is added into without a copy
        total = part if total is None else lloyd.combine(total, part, inplace=True)
        del part
    return total if total is not None else lloyd.empty_stats(*c.shape)


@STAGES.register
@dataclass
class PrototypesStage(Stage):
    """`prototypes/centroids.npy` and `prototypes/kmeans.json` from every shard's embeddings."""

    name = "prototypes"
    reads = ("embed",)
    fingerprint_tag = "kmeans"

    kmeans: KMeansConfig = field(default_factory=KMeansConfig)
    # ssl-prune extend: the parent run's output, whose centroids are copied, not refitted (and its
    # prototypes fingerprint, which then is this one's identity)
    parent: str = field(default="", metadata={"fingerprint": False})
    parent_fingerprint: str = field(default="", metadata={"fingerprint": False})

    def identity(self, ctx: Context) -> tuple:
        if self.parent:
            return ("parent", self.parent_fingerprint)
        # which shards: a shard added to the input changes the prototypes
        return (self.kmeans.fingerprinted(), sorted(ctx.shards.items()))

    def complete(self, ctx: Context) -> Optional[PrototypesStats]:
        out = ctx.out
        if not (out.exists(schema.PROTOTYPES_DIR, schema.KMEANS_META_FILE) and out.exists(schema.PROTOTYPES_DIR, schema.CENTROIDS_FILE)):
            return None
        meta = out.read_json(schema.PROTOTYPES_DIR, schema.KMEANS_META_FILE)
        if meta.get("fingerprint") != ctx.fingerprint:
            return None
        return PrototypesStats(meta["k"], meta["n_ok_total"], meta)

    def run(self, ctx: Context) -> PrototypesStats:
        if self.parent:
            return self.copy_parents(ctx)
        out, kc = ctx.out, self.kmeans
        counts = dict(run_batched(count_ok, [ShardTask(out, s) for s in ctx.shards], desc="prototypes: count"))
        n_ok = sum(counts.values())
        if n_ok == 0:
            raise RuntimeError("no sample could be embedded: nothing to cluster (see scores for reasons)")
        takes = prototypes.sample_sizes(counts, kc.sample_size)
        tasks = [SampleTask(out, s, takes[s], kc.seed) for s in sorted(takes)]
        k = prototypes.k_for(kc, n_ok)
        centroids, meta = fit_sample(kc, tasks, k)
        if kc.refine_iters:
            centroids, meta = refine_all(kc, out, [s for s in sorted(ctx.shards) if counts[s]], centroids, meta,
                                         block_rows=max(counts.values()), n_rows=n_ok)
        meta |= {"fingerprint": ctx.fingerprint, "n_ok_total": n_ok, "k_default_used": kc.k is None}
        # the metadata (with the fingerprint) is removed first and written last: a crash between
        # the two writes must not leave another run's metadata vouching for these centroids
        out.remove(schema.PROTOTYPES_DIR, schema.KMEANS_META_FILE)
        out.write_bytes(npy_bytes(centroids), schema.PROTOTYPES_DIR, schema.CENTROIDS_FILE)
        out.write_json(meta, schema.PROTOTYPES_DIR, schema.KMEANS_META_FILE)
        return PrototypesStats(meta["k"], n_ok, meta)

    def copy_parents(self, ctx: Context) -> PrototypesStats:
        """The parent's centroids and k-means record, with the parent named in it."""
        parent = OutputDir(self.parent)
        with parent.open(schema.PROTOTYPES_DIR, schema.CENTROIDS_FILE) as f:
            centroids = f.read()
        meta = parent.read_json(schema.PROTOTYPES_DIR, schema.KMEANS_META_FILE)
        meta |= {"fingerprint": ctx.fingerprint, "parent": {"output": self.parent, "fingerprint": meta.get("fingerprint")}}
        ctx.out.remove(schema.PROTOTYPES_DIR, schema.KMEANS_META_FILE)
        ctx.out.write_bytes(centroids, schema.PROTOTYPES_DIR, schema.CENTROIDS_FILE)
        ctx.out.write_json(meta, schema.PROTOTYPES_DIR, schema.KMEANS_META_FILE)  # last: present means complete
        return PrototypesStats(meta["k"], meta["n_ok_total"], meta)
