"""`ssl-prune evaluate`: accuracy vs keep fraction per policy, on labeled shards (Ray wiring).

The train and test shards go through the pipeline's own embed stage (into `<output>/train`
and `<output>/test`; a re-run, or the other pool size, reuses them by fingerprint). Per-shard
tasks join embeddings with the labels (and, for the CNN, the decoded pixels) read from the
tars. The driver draws the pool, fits the prototypes and makes every selection with
`prune.selection` (see prune/evaluation.py); the classifier trainings run as Ray tasks, a
bounded number at once, with the big arrays put in the object store once. Each finished run
is written to `results.csv` at once, so a re-run after a crash skips what is done.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow.parquet as pq
import ray

from prune import evaluation as ev
from prune import schema
from prune.config import ConfigError, EvaluateConfig, RunConfig, fingerprint
from prune.decode import PreprocessSpec
from prune.embedders import check_weights, model_id_for
from prune.shards import read_shard
from prune.storage import OutputDir

from . import runtime
from .embed_stage import embed_fingerprint, run_embed
from .run import resolve_shards
from .score_stage import kmeans_settings, ok_matrix

log = logging.getLogger("ssl_prune")

TRAINERS = {ev.LINEAR: ev.train_linear_probe, ev.CNN: ev.train_cnn}


def split_run_config(cfg: EvaluateConfig, split: str, input_spec: str, out: OutputDir) -> RunConfig:
    """The embed stage's view of one split: same decode/embed settings, its own output dir."""
    return RunConfig(input=input_spec, output=out.url_of(split), image_extensions=cfg.image_extensions,
                     ray=cfg.ray, decode=cfg.decode, embed=cfg.embed, kmeans=cfg.kmeans)


def pixel_spec(cfg: EvaluateConfig) -> PreprocessSpec | None:
    """The CNN's input: a uint8 crop of cnn.image_size (only decoded when the CNN is evaluated)."""
    return PreprocessSpec(size=cfg.evaluate.cnn.image_size) if ev.CNN in cfg.evaluate.classifiers else None


def load_shard(item: dict) -> ev.LabeledSet:
    """Task: one shard's embeddings joined with the labels (and pixels) of its tar."""
    out: OutputDir = item["out"]
    shard = item["shard"]
    with out.open(schema.EMBEDDINGS_DIR, f"{shard}.parquet") as f:
        table = pq.read_table(f)
    dim = table.schema.field(schema.EMBEDDING).type.list_size
    shard_error = (table.schema.metadata or {}).get(schema.META_SHARD_ERROR, b"").decode()
    spec: PreprocessSpec | None = item["pixel_spec"]
    empty = ev.join_labels(shard, [], [], np.zeros((0, dim), np.float32), [], item["label_field"], [], spec)
    if shard_error:
        empty.shard_failures[shard] = shard_error
        return empty
    _, vectors = ok_matrix(table)
    keys = table.column(schema.KEY).to_numpy(zero_copy_only=False)
    statuses = table.column(schema.STATUS).to_numpy(zero_copy_only=False)
    read = read_shard(item["url"], item["image_extensions"])
    if read.shard_error:  # the tar broke after it was embedded: nothing of it is usable
        empty.shard_failures[shard] = f"{read.shard_error}: {read.detail}"[:500]
        empty.excluded.update(str(st) if st != schema.STATUS_OK else read.shard_error for st in statuses)
        return empty
    return ev.join_labels(shard, keys, statuses, vectors, read.samples, item["label_field"],
                          item["image_extensions"], spec, item["draft"], item["max_pixels"])


def load_split(cfg: EvaluateConfig, out: OutputDir, shards: dict[str, str]) -> ev.LabeledSet:
    """Every shard's usable samples, in shard order, with the exclusions counted by reason."""
    spec = pixel_spec(cfg)
    items = [{"out": out, "shard": s, "url": shards[s], "label_field": cfg.evaluate.label_field,
              "image_extensions": cfg.image_extensions, "pixel_spec": spec, "draft": cfg.decode.draft,
              "max_pixels": cfg.decode.max_image_pixels} for s in sorted(shards)]
    parts = list(runtime.run_tasks(load_shard, items, desc=f"evaluate: labels {out.url.rsplit('/', 1)[-1]}"))
    dim = parts[0].embeddings.shape[1]  # resolve_shards never gives an empty set
    return ev.LabeledSet.concat(parts, dim, None if spec is None else spec.size)


def train_run(item: dict) -> dict:
    """Task: train one classifier on one kept subset, score it on the test set."""
    import torch

    torch.set_num_threads(1)
    data = runtime.resolve(item["data"])
    idx = item["train_idx"]
    trainer = TRAINERS[item["classifier"]]
    result = trainer(data["train_x"][idx], data["train_y"][idx], data["test_x"], data["test_y"],
                     item["n_classes"], item["config"], item["seed"])
    return result | {"group": item["group"]}


def common_fingerprint(cfg: EvaluateConfig, train_cfg: RunConfig, train_shards: dict, test_shards: dict) -> str:
    """Everything a row's result depends on besides its classifier, policy, fraction and seed."""
    e = cfg.evaluate
    return fingerprint(
        "evaluate", embed_fingerprint(train_cfg), sorted(train_shards.items()), sorted(test_shards.items()),
        kmeans_settings(cfg.kmeans), e.pool_size, e.pool_seed, e.label_field,
        cfg.decode.draft, cfg.decode.max_image_pixels,
    )


def row_fingerprint(common: str, cfg: EvaluateConfig, spec: ev.RunSpec) -> str:
    clf_cfg = getattr(cfg.evaluate, spec.classifier)
    return fingerprint(common, spec.classifier, clf_cfg, spec.policy, spec.keep_fraction, spec.seed)


def embed_splits(cfg: EvaluateConfig, out: OutputDir, shards: dict[str, dict[str, str]]) -> tuple[dict, dict]:
    """The embed stage on the train and the test shards; -> (split -> its OutputDir, split -> stats)."""
    dirs, stats = {}, {}
    for split, input_spec in ((ev.TRAIN_DIR, cfg.train_input), (ev.TEST_DIR, cfg.test_input)):
        run_cfg = split_run_config(cfg, split, input_spec, out)
        dirs[split] = OutputDir(run_cfg.output)
        stats[split] = run_embed(run_cfg, dirs[split], shards[split])
        dirs[split].remove(schema.STAGING_DIR)
    return dirs, stats


class ResultRows:
    """The rows of results.csv: those a previous run finished (same fingerprint) and new ones,
    rewritten atomically after every training so a crash loses at most the runs in flight."""

    def __init__(self, cfg: EvaluateConfig, out: OutputDir, pool_dir: str, common_fp: str, n_pool: int):
        self.cfg, self.out, self.pool_dir, self.common_fp, self.n_pool = cfg, out, pool_dir, common_fp, n_pool
        self.rows: dict[ev.RunSpec, dict] = {}
        self.previous: dict[str, dict] = {}
        if out.exists(pool_dir, ev.RESULTS_CSV):
            with out.open(pool_dir, ev.RESULTS_CSV) as f:
                self.previous = {r[ev.FINGERPRINT]: r for r in ev.read_results_csv(f.read())}

    def finished_before(self, group: ev.RunGroup) -> dict | None:
        """A previous result for any row of the group (they all share one training)."""
        fps = (row_fingerprint(self.common_fp, self.cfg, spec) for spec in group.specs)
        return next((self.previous[fp] for fp in fps if fp in self.previous), None)

    def record(self, group: ev.RunGroup, result: dict) -> None:
        for spec in group.specs:
            self.rows[spec] = {
                ev.POOL: ev.pool_label(self.cfg.evaluate.pool_size), ev.N_POOL: self.n_pool,
                ev.CLASSIFIER: spec.classifier, ev.POLICY: spec.policy, ev.KEEP_FRACTION: spec.keep_fraction,
                ev.SEED: spec.seed, ev.N_TRAIN: int(result[ev.N_TRAIN]), ev.N_TEST: int(result[ev.N_TEST]),
                ev.ACCURACY: float(result[ev.ACCURACY]), ev.STEPS: int(result[ev.STEPS]),
                ev.TRAIN_SECONDS: float(result[ev.TRAIN_SECONDS]),
                ev.SHARED_FROM: "" if spec == group.lead else group.lead.tag,
                ev.FINGERPRINT: row_fingerprint(self.common_fp, self.cfg, spec),
            }

    def ordered(self) -> list[dict]:
        return ev.sort_rows(list(self.rows.values()), self.cfg.evaluate.classifiers, self.cfg.evaluate.policies)

    def write(self) -> None:
        self.out.write_bytes(ev.results_csv(self.ordered()), self.pool_dir, ev.RESULTS_CSV)


def train_groups(cfg: EvaluateConfig, groups: list[ev.RunGroup], todo: list[int], pool: ev.LabeledSet,
                 test: ev.LabeledSet, results: ResultRows) -> None:
    """One Ray task per training, `evaluate.concurrency` at once; each result is written as it lands."""
    e = cfg.evaluate
    classes, (train_y, test_y) = ev.class_indices(pool.labels, test.labels)
    n_classes = len(classes)
    data_refs = {}  # the big arrays go to the object store once, not once per task
    if ev.LINEAR in e.classifiers:
        train_x, test_x = ev.standardize(pool.embeddings, test.embeddings)
        data_refs[ev.LINEAR] = ray.put({"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y})
    if ev.CNN in e.classifiers:
        data_refs[ev.CNN] = ray.put({"train_x": pool.pixels, "train_y": train_y, "test_x": test.pixels, "test_y": test_y})
    # the longest trainings first, so the last ones running side by side are short
    order = sorted(todo, key=lambda gi: (groups[gi].lead.classifier != ev.CNN, -len(groups[gi].train_idx)))
    items = []
    for gi in order:
        lead = groups[gi].lead
        items.append({"group": gi, "classifier": lead.classifier, "seed": lead.seed, "train_idx": groups[gi].train_idx,
                      "n_classes": n_classes, "data": data_refs[lead.classifier], "config": getattr(e, lead.classifier)})
    for result in runtime.run_tasks(train_run, items, max_in_flight=e.concurrency, desc=f"evaluate: train ({results.pool_dir})"):
        results.record(groups[result["group"]], result)
        results.write()


def evaluate(cfg: EvaluateConfig) -> dict:
    """Run (or resume) the whole grid for one pool; returns the output paths and counts."""
    t_start = time.time()
    timings: dict[str, float] = {}
    e = cfg.evaluate
    check_weights(cfg.embed)
    shards = {ev.TRAIN_DIR: resolve_shards(cfg.train_input), ev.TEST_DIR: resolve_shards(cfg.test_input)}
    out = OutputDir(cfg.output)
    out.makedirs()
    how = runtime.connect(cfg.ray)

    t = time.time()
    dirs, embed_stats = embed_splits(cfg, out, shards)
    timings["embed"] = round(time.time() - t, 3)
    t = time.time()
    train_all = load_split(cfg, dirs[ev.TRAIN_DIR], shards[ev.TRAIN_DIR])
    test = load_split(cfg, dirs[ev.TEST_DIR], shards[ev.TEST_DIR])
    timings["labels"] = round(time.time() - t, 3)
    for split, data in ((cfg.train_input, train_all), (cfg.test_input, test)):
        if len(data) == 0:
            raise RuntimeError(f"no usable labeled sample in {split}: {dict(data.excluded)} {data.shard_failures}")
    try:
        pool = train_all.take(ev.draw_pool(len(train_all), e.pool_size, e.pool_seed))
    except ValueError as exc:  # a pool larger than the usable samples: the user's to fix
        raise ConfigError(str(exc)) from None

    t = time.time()
    cluster, distance, kmeans_meta = ev.prototypes(pool.embeddings, cfg.kmeans)
    timings["prototypes"] = round(time.time() - t, 3)
    t = time.time()
    bands = {(p, s): ev.select_bands(p, e.keep_fractions, distance, cluster, kmeans_meta["k"], pool.shards, pool.keys, s)
             for p in e.policies for s in e.seeds}
    groups = ev.plan_runs(e.classifiers, e.policies, e.keep_fractions, e.seeds, bands)
    timings["select"] = round(time.time() - t, 3)

    pool_dir = ev.pool_dir(e.pool_size)
    common_fp = common_fingerprint(cfg, split_run_config(cfg, ev.TRAIN_DIR, cfg.train_input, out),
                                   shards[ev.TRAIN_DIR], shards[ev.TEST_DIR])
    results = ResultRows(cfg, out, pool_dir, common_fp, len(pool))
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
        train_groups(cfg, groups, todo, pool, test, results)
    timings["train"] = round(time.time() - t, 3)

    rows = results.ordered()
    fractions = sorted(e.keep_fractions)
    model_id = model_id_for(cfg.embed)
    label = ev.pool_label(e.pool_size)
    header = {"pool": label, "n_pool": len(pool), "model_id": model_id, "random_init": not cfg.embed.pretrained,
              "k": kmeans_meta["k"], "n_test": len(test), "seeds": e.seeds}
    out.write_bytes(ev.markdown_table(rows, e.classifiers, e.policies, fractions, header).encode(), pool_dir, ev.RESULTS_MD)
    title = f"pool: {label} ({len(pool)} samples) · encoder {model_id} · k = {kmeans_meta['k']}"
    out.write_bytes(ev.accuracy_plot(rows, e.classifiers, e.policies, fractions, title), pool_dir, ev.PLOT_PNG)
    timings["total"] = round(time.time() - t_start, 3)
    agg = ev.aggregate(rows)
    summary = {
        "tool": "ssl-prune evaluate",
        "config": cfg.model_dump(),
        "ray": how,
        "model_id": model_id,
        "random_init": not cfg.embed.pretrained,
        "pool": {"label": label, "n_pool": len(pool), "n_available": len(train_all), "pool_seed": e.pool_seed,
                 "label_counts": ev.label_counts(pool.labels)},
        "test": {"n_test": len(test), "label_counts": ev.label_counts(test.labels)},
        "excluded": {ev.TRAIN_DIR: dict(sorted(train_all.excluded.items())), ev.TEST_DIR: dict(sorted(test.excluded.items()))},
        "shard_failures": {ev.TRAIN_DIR: train_all.shard_failures, ev.TEST_DIR: test.shard_failures},
        "prototypes": kmeans_meta,
        "embed": embed_stats,
        "runs": {"rows": len(rows), "trainings": len(groups), "reused_from_previous_run": len(groups) - len(todo),
                 "trained_now": len(todo), "shared_rows": sum(1 for r in rows if r[ev.SHARED_FROM])},
        "train_seconds": _seconds_by_classifier(rows),
        "best_policy": {clf: {ev.fraction_label(f): p for f, p in ev.best_policies(agg, clf, e.policies, fractions).items()}
                        for clf in e.classifiers},
        "timings_s": timings,
    }
    out.write_json(summary, pool_dir, ev.SUMMARY_JSON)
    return {
        "runs": len(rows),
        "trainings": len(groups),
        "trained_now": len(todo),
        "csv": out.url_of(pool_dir, ev.RESULTS_CSV),
        "markdown": out.url_of(pool_dir, ev.RESULTS_MD),
        "plot": out.url_of(pool_dir, ev.PLOT_PNG),
        "summary": out.url_of(pool_dir, ev.SUMMARY_JSON),
    }


def _seconds_by_classifier(rows: list[dict]) -> dict:
    """Wall time of the trainings themselves (shared rows counted once), per classifier."""
    out = {}
    for clf in sorted({r[ev.CLASSIFIER] for r in rows}):
        secs = [r[ev.TRAIN_SECONDS] for r in rows if r[ev.CLASSIFIER] == clf and not r[ev.SHARED_FROM]]
        out[clf] = {"trainings": len(secs), "total": round(sum(secs), 2), "max": max(secs, default=0.0),
                    "mean": round(float(np.mean(secs)), 2) if secs else 0.0}
    return out
