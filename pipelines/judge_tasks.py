"""The `clip` classifier of `evaluate`: the pretraining judge on each kept subset (Ray wiring).

Per training (one subset, one seed) a Ray task copies the subset's samples out of the pool's tars
into `<pool dir>/subsets/<digest>/shards/` (prune/evaluate/subset_shards.py), trains a fresh small
CLIP on them with open_clip's own trainer for `evaluate.clip.samples_seen` samples
(pipelines/pretrain_judge.py, in `<digest>/seed-<s>/`), and scores it zero-shot on the test split
(prompts from `evaluate.class_names`) and by retrieval on held-out test pairs (image, caption).
Both steps find their finished work on a re-run; a killed training resumes from its last epoch.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import numpy as np

from prune import evaluate as ev
from prune.evaluate import pretrain as P
from prune.evaluate.settings import EvaluateSection, PretrainConfig
from prune.evaluate.subset_shards import write_subset_shards
from prune.settings import ConfigError

from . import runtime


def judge_settings(c: PretrainConfig, seed: int):
    """The `evaluate.clip` section as the judge's settings (one training per seed)."""
    from .pretrain_judge import JudgeSettings

    model = P.tiny_clip_config(image_size=c.image_size, patch_size=c.patch_size, vision_width=c.width,
                               vision_layers=c.layers, context_length=c.context_length, text_width=c.width,
                               text_layers=c.layers, embed_dim=c.embed_dim)
    return JudgeSettings(samples_seen=c.samples_seen, batch_size=c.batch_size, epochs=c.epochs, lr=c.lr,
                         warmup=c.warmup, wd=c.wd, seed=seed, threads=c.threads, timeout_s=c.timeout_s, model=model)


def subset_digest(idx: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(idx, np.int64).tobytes()).hexdigest()[:16]


def eval_data(e: EvaluateSection, test: ev.LabeledSet, classes: np.ndarray, test_y: np.ndarray) -> dict:
    """What every judge scores on: the test images and class indices, the class names of those
    classes (zero-shot prompts), and `clip.n_pairs` held-out pairs drawn (seeded) from the test
    samples that have a caption."""
    names = e.class_names or []
    missing = [int(c) for c in classes if not 0 <= int(c) < len(names)]
    if missing:
        raise ConfigError(f"evaluate.class_names has {len(names)} names but the data have label(s) {missing[:5]}: "
                          "list the class name of every label, in label order")
    if test.pixels is None or test.captions is None:
        raise ValueError("the clip judge needs the test split's pixels and captions")
    with_caption = np.flatnonzero(test.captions != "")
    if not len(with_caption):
        raise ConfigError("the test split has no captions (.txt members): the clip judge's retrieval needs "
                          "held-out image-caption pairs")
    rng = np.random.default_rng(e.clip.pairs_seed)
    pairs = np.sort(rng.choice(with_caption, min(e.clip.n_pairs, len(with_caption)), replace=False))
    return {"images": test.pixels, "labels": test_y, "class_names": [names[int(c)] for c in classes],
            "pair_images": test.pixels[pairs], "pair_captions": [str(c) for c in test.captions[pairs]]}


@dataclass(frozen=True)
class ClipTask:
    group: int
    seed: int
    workdir: str  # <pool dir>/subsets/<digest>: shards/ and seed-<s>/
    sources: dict  # pool shard -> its tar's URL
    kept: dict  # pool shard -> the keys the subset keeps
    settings: PretrainConfig
    data: object  # ObjectRef of eval_data(...)


def clip_run(task: ClipTask) -> dict:
    """Task: the subset's shards (once per subset), then one judged training."""
    from .pretrain_judge import judge

    shard_dir = os.path.join(task.workdir, "shards")
    sizes = write_subset_shards(task.sources, task.kept, shard_dir)
    data = runtime.resolve(task.data)
    settings = judge_settings(task.settings, task.seed)
    record = judge(shard_dir, os.path.join(task.workdir, f"seed-{task.seed}"), settings, data["images"],
                   data["labels"], data["class_names"], data["pair_images"], data["pair_captions"], name="run",
                   about_eval={"n_test": len(data["labels"]), "n_pairs": len(data["pair_captions"])})
    m, t = record["metrics"], record["train"]
    zero_shot, retrieval = m["zero_shot"], m["retrieval"]
    return {"group": task.group, ev.N_TRAIN: sum(sizes.values()), ev.N_TEST: m["n_test"],
            ev.ACCURACY: zero_shot[P.ACCURACY], ev.BALANCED_ACCURACY: zero_shot[P.BALANCED_ACCURACY],
            ev.WORST3_ACCURACY: zero_shot[P.WORST_ACCURACY], ev.RECALL_1: retrieval["mean_R@1"],
            ev.RECALL_5: retrieval["mean_R@5"], ev.STEPS: t["plan"]["steps"],
            ev.TRAIN_SECONDS: float(t["seconds"]) + float(m["eval_seconds"])}


def clip_tasks(groups: list, todo: list[int], pool: ev.LabeledSet, sources: dict, pool_root: str,
               settings: PretrainConfig, data_ref) -> list[ClipTask]:
    """One task per clip training; `pool_root`: the local path of the pool's output directory."""
    tasks = []
    for gi in todo:
        g = groups[gi]
        kept: dict[str, list[str]] = {}
        for shard, key in zip(pool.shards[g.train_idx], pool.keys[g.train_idx]):
            kept.setdefault(str(shard), []).append(str(key))
        workdir = os.path.join(pool_root, ev.SUBSETS_DIR, subset_digest(g.train_idx))
        tasks.append(ClipTask(gi, g.lead.seed, workdir, {s: sources[s] for s in kept}, kept, settings, data_ref))
    return tasks


class SubsetCleanup:
    """Deletes a subset's shards once the last training that reads them is scored (unless
    `evaluate.clip.keep_shards`); the same subset serves several seeds, possibly at the same time.
    A re-run that needs them again writes the same bytes."""

    def __init__(self, tasks: list[ClipTask], keep: bool):
        self.keep = keep
        self.workdir = {t.group: t.workdir for t in tasks}
        self.remaining = Counter(t.workdir for t in tasks)

    def done(self, group: int) -> None:
        workdir = self.workdir[group]
        self.remaining[workdir] -= 1
        if not self.keep and self.remaining[workdir] == 0:
            shutil.rmtree(os.path.join(workdir, "shards"), ignore_errors=True)


def local_root(out, pool_dir: str) -> Optional[str]:
    """The pool directory's local path, or None when the output is not on a local filesystem."""
    from prune.io.storage import is_local

    return out.path(pool_dir) if is_local(out.fs) else None
