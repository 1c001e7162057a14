"""Evaluate stage: accuracy vs keep fraction per policy, on labeled shards (Ray wiring).

The `evaluate` job is [embed (split train), embed (split test), evaluate]: the train and test
shards go through the pipeline's own embed stage (into `<output>/train` and `<output>/test`; a
re-run, or the other pool size, reuses them by fingerprint). Here, per-shard tasks join the
embeddings with the labels (and, for the CNN, the decoded pixels) read from the tars; the driver
draws the pool, fits the prototypes and makes every selection with the library calls the
prototypes and select stages make (prune/evaluate/subsets.py); the classifier trainings run as
Ray tasks, a bounded number at once, with the big arrays put in the object store once. Each
finished run is written to `results.csv` at once, so a re-run after a crash trains only what is
missing: that is this stage's resume scheme, so it is never "complete" to the executor.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import ray

from prune import evaluate as ev
from prune import schema
from prune.cluster.settings import KMeansConfig
from prune.embed.backends import model_id_for
from prune.embed.decode import PreprocessSpec
from prune.embed.settings import DecodeConfig, EmbedConfig
from prune.evaluate.settings import EvaluateSection
from prune.io.shards import read_shard
from prune.io.storage import OutputDir
from prune.io.tables import ok_matrix, read_embeddings
from prune.select.auto import AUTO
from prune.settings import ConfigError, fingerprint

from .. import judge_tasks, runtime
from ..executor import as_dict
from ..stage import Context, Stage

log = logging.getLogger("ssl_prune")

TRAINERS = {ev.LINEAR: ev.train_linear_probe, ev.CNN: ev.train_cnn}


@dataclass
class EvaluateStats:
    runs: int
    trainings: int
    trained_now: int
    csv: str
    markdown: str
    plot: str
    summary: str


@dataclass(frozen=True)
class LabelTask:
    out: OutputDir  # the split's embed output
    shard: str
    url: str
    label_field: str
    image_extensions: tuple
    pixel_spec: Optional[PreprocessSpec]  # None: no classifier needs pixels
    draft: bool
    max_pixels: int
    with_captions: bool = False  # the clip judge's held-out pairs (test split)


def load_shard(task: LabelTask) -> ev.LabeledSet:
    """Task: one shard's embeddings joined with the labels (and pixels) of its tar."""
    table = read_embeddings(task.out, task.shard)
    dim = table.schema.field(schema.EMBEDDING).type.list_size
    shard_error = (table.schema.metadata or {}).get(schema.META_SHARD_ERROR, b"").decode()
    empty = ev.join_labels(task.shard, [], [], np.zeros((0, dim), np.float32), [], task.label_field, [], task.pixel_spec)
    if shard_error:
        empty.shard_failures[task.shard] = shard_error
        return empty
    ok, vectors = ok_matrix(table)
    scores = None
    if schema.CLIP_SCORE in table.column_names:  # embedded with text: the caption policies' scores
        scores = table.column(schema.CLIP_SCORE).to_numpy(zero_copy_only=False)[ok].astype(np.float32)
    keys = table.column(schema.KEY).to_numpy(zero_copy_only=False)
    statuses = table.column(schema.STATUS).to_numpy(zero_copy_only=False)
    read = read_shard(task.url, task.image_extensions)
    if read.shard_error:  # the tar broke after it was embedded: nothing of it is usable
        empty.shard_failures[task.shard] = f"{read.shard_error}: {read.detail}"[:500]
        empty.excluded.update(str(st) if st != schema.STATUS_OK else read.shard_error for st in statuses)
        return empty
    return ev.join_labels(task.shard, keys, statuses, vectors, read.samples, task.label_field,
                          task.image_extensions, task.pixel_spec, task.draft, task.max_pixels, scores,
                          task.with_captions)


@dataclass(frozen=True)
class TrainTask:
    group: int
    classifier: str
    seed: int
    train_idx: np.ndarray
    n_classes: int
    data: object  # ObjectRef of {train_x, train_y, test_x, test_y}, shared by every task
    config: object  # the classifier's settings section


def train_run(task: TrainTask) -> dict:
    """Task: train one classifier on one kept subset, score it on the test set."""
    import torch

    torch.set_num_threads(1)
    data = runtime.resolve(task.data)
    idx = task.train_idx
    result = TRAINERS[task.classifier](data["train_x"][idx], data["train_y"][idx], data["test_x"], data["test_y"],
                                       task.n_classes, task.config, task.seed)
    return result | {"group": task.group}


class ResultRows:
    """The rows of results.csv: those a previous run finished (same fingerprint) and new ones,
    rewritten atomically after every training so a crash loses at most the runs in flight."""

    def __init__(self, e: EvaluateSection, out: OutputDir, pool_dir: str, common_fp: str, n_pool: int,
                 kinds: np.ndarray, cluster: np.ndarray, caption_kinds: Optional[np.ndarray] = None):
        self.e, self.out, self.pool_dir, self.common_fp, self.n_pool = e, out, pool_dir, common_fp, n_pool
        self.kinds, self.cluster, self.caption_kinds = kinds, cluster, caption_kinds
        self.rows: dict[ev.RunSpec, dict] = {}
        self.previous: dict[str, dict] = {}
        if out.exists(pool_dir, ev.RESULTS_CSV):
            with out.open(pool_dir, ev.RESULTS_CSV) as f:
                self.previous = {r[ev.FINGERPRINT]: r for r in ev.read_results_csv(f.read())}

    def row_fingerprint(self, spec: ev.RunSpec) -> str:
        clf_cfg = getattr(self.e, spec.classifier)
        if spec.classifier == ev.CLIP:
            clf_cfg = clf_cfg.fingerprinted()  # without where the shards stay or the time limit
        version = (ev.CNN_VERSION,) if spec.classifier == ev.CNN else ()
        # the dedup settings count only in the rows of policies that dedup: a new eps trains those
        # again and reuses every other row; so do caption_share and the class names
        parts = spec.policy.split("+")
        dedup = (self.e.dedup,) if "dedup" in parts[:-1] else ()
        caption = (self.e.caption_share,) if ev.CAPTION in parts and len(parts) > 1 else ()
        if spec.policy.startswith(ev.CAPTION_PREFIX):
            caption += (ev.CAPTION_FIRST_RULE,)
        names = (self.e.class_names,) if spec.classifier == ev.CLIP else ()
        auto = (self.e.auto_tail_ratio,) if AUTO in parts else ()
        return fingerprint(self.common_fp, spec.classifier, clf_cfg, spec.policy, spec.keep_fraction, spec.seed,
                           *version, *dedup, *caption, *names, *auto)

    def finished_before(self, group: ev.RunGroup) -> dict | None:
        """A previous result for any row of the group (they all share one training)."""
        fps = (self.row_fingerprint(spec) for spec in group.specs)
        return next((self.previous[fp] for fp in fps if fp in self.previous), None)

    def record(self, group: ev.RunGroup, result: dict) -> None:
        kept = ev.subset_stats(group.train_idx, self.kinds, self.cluster, self.caption_kinds)
        for spec in group.specs:
            self.rows[spec] = {
                ev.POOL: ev.pool_label(self.e.pool_size), ev.N_POOL: self.n_pool,
                ev.CLASSIFIER: spec.classifier, ev.POLICY: spec.policy, ev.KEEP_FRACTION: spec.keep_fraction,
                ev.SEED: spec.seed, ev.N_TRAIN: int(result[ev.N_TRAIN]), ev.N_TEST: int(result[ev.N_TEST]),
                ev.ACCURACY: float(result[ev.ACCURACY]), ev.STEPS: int(result[ev.STEPS]),
                ev.BALANCED_ACCURACY: float(result.get(ev.BALANCED_ACCURACY, float("nan"))),
                ev.WORST3_ACCURACY: float(result.get(ev.WORST3_ACCURACY, float("nan"))),
                ev.RECALL_1: float(result.get(ev.RECALL_1, float("nan"))),
                ev.RECALL_5: float(result.get(ev.RECALL_5, float("nan"))), **kept,
                ev.TRAIN_SECONDS: float(result[ev.TRAIN_SECONDS]),
                ev.SHARED_FROM: "" if spec == group.lead else group.lead.tag,
                ev.FINGERPRINT: self.row_fingerprint(spec),
            }

    def ordered(self) -> list[dict]:
        return ev.sort_rows(list(self.rows.values()), self.e.classifiers, self.e.policies)

    def write(self) -> None:
        self.out.write_bytes(ev.results_csv(self.ordered()), self.pool_dir, ev.RESULTS_CSV)


def _seconds_by_classifier(rows: list[dict]) -> dict:
    """Wall time of the trainings themselves (shared rows counted once), per classifier."""
    out = {}
    for clf in sorted({r[ev.CLASSIFIER] for r in rows}):
        secs = [r[ev.TRAIN_SECONDS] for r in rows if r[ev.CLASSIFIER] == clf and not r[ev.SHARED_FROM]]
        out[clf] = {"trainings": len(secs), "total": round(sum(secs), 2), "max": max(secs, default=0.0),
                    "mean": round(float(np.mean(secs)), 2) if secs else 0.0}
    return out


@dataclass
class EvaluateStage(Stage):
    """results.csv, results.md, accuracy.png and summary.json of one pool, in `<output>/pool-<all|N>/`."""

    name = "evaluate"

    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)  # for the record: which model embedded the splits
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    image_extensions: tuple[str, ...] = schema.IMAGE_EXTENSIONS_DEFAULT
    config: dict = field(default_factory=dict)  # the whole job config, recorded in summary.json

    def identity(self, ctx: Context) -> tuple:
        """Everything a row's result depends on besides its classifier, policy, fraction and seed."""
        e, train, test = self.evaluate, ctx.splits[ev.TRAIN_DIR], ctx.splits[ev.TEST_DIR]
        parts = (ctx.earlier_fingerprints[f"embed:{ev.TRAIN_DIR}"], sorted(train.shards.items()), sorted(test.shards.items()),
                 self.kmeans.fingerprinted(), e.pool_size, e.pool_seed, e.label_field,
                 self.decode.draft, self.decode.max_image_pixels)
        defaults = type(e)().select_options()
        return parts + ((e.select_options(),) if e.select_options() != defaults else ())

    def complete(self, ctx: Context) -> None:
        return None  # resumes row by row from results.csv (see the module docstring)

    def pixel_spec(self) -> PreprocessSpec | None:
        """The CNN's input: a uint8 crop of cnn.image_size, else the clip judge's test images at its
        model's size (only decoded when a classifier needs pixels)."""
        e = self.evaluate
        if ev.CNN in e.classifiers:
            return PreprocessSpec(size=e.cnn.image_size)
        return PreprocessSpec(size=e.clip.image_size) if ev.CLIP in e.classifiers else None

    def load_split(self, split: Context, with_captions: bool = False) -> ev.LabeledSet:
        """Every shard's usable samples, in shard order, with the exclusions counted by reason."""
        spec = self.pixel_spec()
        tasks = [LabelTask(split.out, s, split.shards[s], self.evaluate.label_field, tuple(self.image_extensions), spec,
                           self.decode.draft, self.decode.max_image_pixels, with_captions) for s in sorted(split.shards)]
        parts = list(runtime.run_tasks(load_shard, tasks, desc=f"evaluate: labels {split.out.url.rsplit('/', 1)[-1]}"))
        dim = parts[0].embeddings.shape[1]  # resolve_shards never gives an empty set
        return ev.LabeledSet.concat(parts, dim, None if spec is None else spec.size)

    def train_groups(self, groups: list[ev.RunGroup], todo: list[int], pool: ev.LabeledSet,
                     test: ev.LabeledSet, results: ResultRows, ctx: Context) -> None:
        """One Ray task per training, `evaluate.concurrency` at once; each result is written as it lands."""
        e = self.evaluate
        classes, (train_y, test_y) = ev.class_indices(pool.labels, test.labels)
        clip_todo = [gi for gi in todo if groups[gi].lead.classifier == ev.CLIP]
        todo = [gi for gi in todo if groups[gi].lead.classifier != ev.CLIP]
        if clip_todo:
            self.train_clip_groups(groups, clip_todo, pool, ctx, results,
                                   ray.put(judge_tasks.eval_data(e, test, classes, test_y)))
        if not todo:
            return
        data_refs = {}  # the big arrays go to the object store once, not once per task
        if ev.LINEAR in e.classifiers:
            train_x, test_x = ev.standardize(pool.embeddings, test.embeddings)
            data_refs[ev.LINEAR] = ray.put({"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y})
        if ev.CNN in e.classifiers:
            data_refs[ev.CNN] = ray.put({"train_x": pool.pixels, "train_y": train_y, "test_x": test.pixels, "test_y": test_y})
        # the longest trainings first, so the last ones running side by side are short
        order = sorted(todo, key=lambda gi: (groups[gi].lead.classifier != ev.CNN, -len(groups[gi].train_idx)))
        tasks = [TrainTask(gi, groups[gi].lead.classifier, groups[gi].lead.seed, groups[gi].train_idx, len(classes),
                           data_refs[groups[gi].lead.classifier], getattr(e, groups[gi].lead.classifier)) for gi in order]
        for result in runtime.run_tasks(train_run, tasks, max_in_flight=e.concurrency, desc=f"evaluate: train ({results.pool_dir})"):
            results.record(groups[result["group"]], result)
            results.write()

    def train_clip_groups(self, groups: list[ev.RunGroup], todo: list[int], pool: ev.LabeledSet, ctx: Context,
                          results: ResultRows, data_ref) -> None:
        """The pretraining judge per subset and seed (pipelines/stages/judge_tasks.py)."""
        root = judge_tasks.local_root(ctx.out, results.pool_dir)
        if root is None:
            raise ConfigError(f"output={ctx.out.url}: the clip classifier trains open_clip_train on local shards; "
                              "evaluate into a local directory")
        sources = ctx.splits[ev.TRAIN_DIR].shards
        # seed by seed (a grid stopped early has whole seeds), the largest subsets first in each
        order = sorted(todo, key=lambda gi: (groups[gi].lead.seed, -len(groups[gi].train_idx)))
        tasks = judge_tasks.clip_tasks(groups, order, pool, sources, root, self.evaluate.clip, data_ref)
        cleanup = judge_tasks.SubsetCleanup(tasks, self.evaluate.clip.keep_shards)
        for result in runtime.run_tasks(judge_tasks.clip_run, tasks, max_in_flight=self.evaluate.concurrency,
                                        desc=f"evaluate: pretrain ({results.pool_dir})"):
            results.record(groups[result["group"]], result)
            results.write()
            cleanup.done(result["group"])

    def run(self, ctx: Context) -> EvaluateStats:
        """Run (or resume) the whole grid for one pool."""
        t_start = time.time()
        timings: dict[str, float] = {}
        e, out = self.evaluate, ctx.out
        t = time.time()
        train_all = self.load_split(ctx.splits[ev.TRAIN_DIR])
        test = self.load_split(ctx.splits[ev.TEST_DIR], with_captions=ev.CLIP in e.classifiers)
        timings["labels"] = round(time.time() - t, 3)
        for split, data in ((ev.TRAIN_DIR, train_all), (ev.TEST_DIR, test)):
            if len(data) == 0:
                raise RuntimeError(f"no usable labeled sample in the {split} input: {dict(data.excluded)} {data.shard_failures}")
        try:
            pool = train_all.take(ev.draw_pool(len(train_all), e.pool_size, e.pool_seed))
        except ValueError as exc:  # a pool larger than the usable samples: the user's to fix
            raise ConfigError(str(exc)) from None

        t = time.time()
        cluster, distance, kmeans_meta, centroids = ev.prototypes(pool.embeddings, self.kmeans, pool.shards)
        timings["prototypes"] = round(time.time() - t, 3)
        t = time.time()
        selection = ev.PoolSelection(pool.embeddings, distance, cluster, kmeans_meta["k"], pool.shards, pool.keys,
                                     centroids, pool.labels, pool.kinds, pool.clip_scores, pool.caption_kinds, e.dedup,
                                     e.caption_share, e.select_options(), e.auto_tail_ratio)
        if any(ev.CAPTION in p.split("+") for p in e.policies) and pool.clip_scores is None:
            raise ConfigError("evaluate.policies: a caption policy needs each pair's clip score; embed the train "
                              "split with embed.text=true and a backend with a text tower")
        if any(p.startswith(ev.DEDUP_PREFIX) for p in e.policies):
            kmeans_meta["dedup_removed"] = int(selection.removed().sum())
        if any(AUTO in p.split("+") for p in e.policies):
            kmeans_meta["auto"] = selection.auto_choice().as_dict()
        if pool.clip_scores is not None:
            kmeans_meta["pairs_without_caption_score"] = int(np.isnan(pool.clip_scores).sum())
        bands = {(p, s): selection.subsets(p, e.keep_fractions, s) for p in e.policies for s in e.seeds}
        groups = ev.plan_runs(e.classifiers, e.policies, e.keep_fractions, e.seeds, bands)
        timings["select"] = round(time.time() - t, 3)

        pool_dir = ev.pool_dir(e.pool_size)
        results = ResultRows(e, out, pool_dir, ctx.fingerprint, len(pool), pool.kinds, cluster, pool.caption_kinds)
        todo = []
        for gi, group in enumerate(groups):
            done = results.finished_before(group)
            if done is not None:
                results.record(group, done)
            else:
                todo.append(gi)
        log.info("evaluate %s: %d runs in %d trainings (%d done before, %d to train)",
                 pool_dir, sum(len(g.specs) for g in groups), len(groups), len(groups) - len(todo), len(todo))
        results.write()  # also drops the rows another configuration left behind
        t = time.time()
        if todo:
            self.train_groups(groups, todo, pool, test, results, ctx)
        timings["train"] = round(time.time() - t, 3)

        rows = results.ordered()
        fractions = sorted(e.keep_fractions)
        model_id = model_id_for(self.embed)
        label = ev.pool_label(e.pool_size)
        header = {"pool": label, "n_pool": len(pool), "model_id": model_id, "random_init": not self.embed.pretrained,
                  "k": kmeans_meta["k"], "n_test": len(test), "seeds": e.seeds}
        out.write_bytes(ev.markdown_table(rows, e.classifiers, e.policies, fractions, header).encode(), pool_dir, ev.RESULTS_MD)
        title = f"pool: {label} ({len(pool)} samples) · encoder {model_id} · k = {kmeans_meta['k']}"
        out.write_bytes(ev.accuracy_plot(rows, e.classifiers, e.policies, fractions, title), pool_dir, ev.PLOT_PNG)
        timings["total"] = round(time.time() - t_start, 3)
        agg = ev.aggregate(rows)
        summary = {
            "tool": "ssl-prune evaluate",
            "config": self.config,
            "ray": ctx.ray,
            "model_id": model_id,
            "random_init": not self.embed.pretrained,
            "pool": {"label": label, "n_pool": len(pool), "n_available": len(train_all), "pool_seed": e.pool_seed,
                     "label_counts": ev.label_counts(pool.labels)},
            "test": {"n_test": len(test), "label_counts": ev.label_counts(test.labels)},
            "excluded": {ev.TRAIN_DIR: dict(sorted(train_all.excluded.items())), ev.TEST_DIR: dict(sorted(test.excluded.items()))},
            "shard_failures": {ev.TRAIN_DIR: train_all.shard_failures, ev.TEST_DIR: test.shard_failures},
            "prototypes": kmeans_meta,
            "embed": {split: _as_dict(ctx.earlier_stats.get(f"embed:{split}")) for split in (ev.TRAIN_DIR, ev.TEST_DIR)},
            "runs": {"rows": len(rows), "trainings": len(groups), "reused_from_previous_run": len(groups) - len(todo),
                     "trained_now": len(todo), "shared_rows": sum(1 for r in rows if r[ev.SHARED_FROM])},
            "train_seconds": _seconds_by_classifier(rows),
            "best_policy": {clf: {ev.fraction_label(f): p for f, p in ev.best_policies(agg, clf, e.policies, fractions).items()}
                            for clf in e.classifiers},
            "timings_s": timings,
        }
        out.write_json(summary, pool_dir, ev.SUMMARY_JSON)
        return EvaluateStats(
            runs=len(rows), trainings=len(groups), trained_now=len(todo),
            csv=out.url_of(pool_dir, ev.RESULTS_CSV), markdown=out.url_of(pool_dir, ev.RESULTS_MD),
            plot=out.url_of(pool_dir, ev.PLOT_PNG), summary=out.url_of(pool_dir, ev.SUMMARY_JSON),
        )


def _as_dict(stats) -> Optional[dict]:
    return None if stats is None else as_dict(stats)
