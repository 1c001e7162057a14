"""The pretraining judge's pure pieces (design.md section 6, DataComp's fixed compute): a small CLIP
config open_clip_train finds by name, the argv of open_clip's own trainer for a fixed number of
samples seen, the launcher that runs it in a process of its own, and the scores of a trained model
(zero-shot accuracy with prompt ensembling, balanced and worst-k accuracy, retrieval recall@k). No
Ray; pipelines/pretrain_judge.py runs the trainer, finds and loads its checkpoint, and scores it.

How open_clip_train (open_clip_torch 3.3.0) counts for `--dataset-type webdataset`: an "epoch" is
`--train-num-samples` samples, not a pass over the shards: `get_wds_dataset` makes it
`ceil(ceil(train_num_samples / batch_size) / W) * W` full batches (W = max(1, --workers), one
process; `with_epoch`), and it trains `--epochs` of them. A subset smaller than an epoch is read
again (webdataset repeats the pipeline), a larger one only as far as the epoch goes. So the samples
seen, epochs * batches * batch_size, do not depend on the subset's size (`samples_seen_plan`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from prune import schema

# The tiny CLIP's defaults (a ViT on 32 px images and a 16-token text transformer). "vit" in the
# name matters: open_clip_train picks its AdamW defaults by name (ViT: betas (0.9, 0.98), eps 1e-6).
MODEL_PREFIX = "sslprune-vit-tiny"
OPEN_CLIP_VOCAB = 49408  # open_clip's default tokenizer (CLIP's BPE): the text tower's vocabulary

# Keys of the metrics dict (accuracy keys as prune/evaluate/layout.py's results columns).
ACCURACY, BALANCED_ACCURACY, WORST_ACCURACY = "accuracy", "balanced_accuracy", "worst3_accuracy"

# CLIP-style prompt ensemble for the zero-shot classifier: `{a}` is the class name with its
# article ("an ankle boot"), `{n}` the bare name. The embeddings of a class's prompts are averaged.
ZERO_SHOT_TEMPLATES = ("a photo of {a}", "{n}", "a photo of the {n}", "a black and white photo of {a}",
                       "a low resolution photo of {a}", "a product photo of {a}", "a close-up photo of {a}")

# Environment variables that make open_clip_train believe it is one rank of a distributed job
# (open_clip_train/distributed.py): a Ray worker on a SLURM node inherits SLURM_NTASKS etc.
_DISTRIBUTED_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "SLURM_PROCID",
                    "SLURM_LOCALID", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_RANK",
                    "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


# --- the model config ---------------------------------------------------------------------------

def tiny_clip_config(image_size: int = 32, patch_size: int = 4, vision_width: int = 64, vision_layers: int = 2,
                     context_length: int = 16, text_width: int = 64, text_layers: int = 2, embed_dim: int = 64,
                     head_width: int = 32) -> dict:
    """An open_clip model config (the `model_configs/*.json` schema) for a CLIP small enough for a CPU.

    Fashion-MNIST's 28 px images are resized to `image_size`; `context_length` cuts the captions'
    tokens (the demo's captions are 5-20 tokens). Heads are `width / head_width` in both towers.
    """
    for name, width in (("vision_width", vision_width), ("text_width", text_width)):
        if width % head_width:
            raise ValueError(f"{name} {width} is not a multiple of head_width {head_width}")
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": vision_layers, "width": vision_width,
                       "patch_size": patch_size, "head_width": head_width},
        "text_cfg": {"context_length": context_length, "vocab_size": OPEN_CLIP_VOCAB, "width": text_width,
                     "heads": text_width // head_width, "layers": text_layers},
    }


def model_name_for(cfg: Mapping) -> str:
    """The name the config is registered under: the same config, the same name (open_clip's registry
    is process-global, so two configs must never share a name)."""
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    return f"{MODEL_PREFIX}-{digest}"


def write_model_config(directory: str, cfg: Mapping, name: Optional[str] = None) -> str:
    """Write `cfg` as `<directory>/<name>.json`, where `open_clip.add_model_config(directory)` finds
    it (the registry key is the file's stem) -> the name."""
    name = name or model_name_for(cfg)
    if "/" in name or name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"model name {name!r}: open_clip would read it as a path or a schema")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{name}.json")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(dict(cfg), f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return name


def register_model_config(directory: str) -> None:
    """Make the configs in `directory` (or one .json file) known to open_clip by name, in this process."""
    import open_clip

    open_clip.add_model_config(directory)


# --- samples seen --------------------------------------------------------------------------------

def open_clip_epoch(train_num_samples: int, batch_size: int, workers: int = 0, world_size: int = 1) -> tuple[int, int]:
    """(batches, samples) of one training epoch as open_clip_train's `get_wds_dataset` makes it:
    full batches only, rounded up, and a multiple of the dataloader workers (0 counts as 1)."""
    global_batch = batch_size * world_size
    batches = math.ceil(train_num_samples / global_batch)
    n_workers = max(1, workers)
    batches = math.ceil(batches / n_workers) * n_workers
    return batches, batches * global_batch


@dataclass(frozen=True)
class SamplesPlan:
    requested: int  # samples seen asked for
    train_num_samples: int  # --train-num-samples (per epoch)
    epochs: int  # --epochs (also the number of checkpoints, hence of resume points)
    batch_size: int
    steps_per_epoch: int
    steps: int  # optimizer steps in all
    samples_seen: int  # what open_clip_train will actually train on: steps * batch_size

    def as_dict(self) -> dict:
        return asdict(self)


def samples_seen_plan(samples_seen: int, batch_size: int, epochs: int = 1, workers: int = 0) -> SamplesPlan:
    """`--train-num-samples` and `--epochs` for `samples_seen` in all, whatever the subset's size.

    The same numbers for every subset (DataComp's fixed compute). The total is exact when
    `samples_seen` is a multiple of `epochs * batch_size * max(1, workers)`; else it is rounded up
    to the next full batch of every epoch (`samples_seen` in the plan says what will be seen).
    """
    if samples_seen < 1 or batch_size < 1 or epochs < 1:
        raise ValueError(f"samples_seen {samples_seen}, batch_size {batch_size}, epochs {epochs}: each must be >= 1")
    per_epoch = math.ceil(samples_seen / epochs)
    batches, seen_per_epoch = open_clip_epoch(per_epoch, batch_size, workers)
    return SamplesPlan(requested=samples_seen, train_num_samples=per_epoch, epochs=epochs, batch_size=batch_size,
                       steps_per_epoch=batches, steps=batches * epochs, samples_seen=seen_per_epoch * epochs)


# --- the shards and the argv ---------------------------------------------------------------------

@dataclass(frozen=True)
class Shards:
    pattern: str  # brace notation over the tars, as --train-data takes it
    paths: tuple[str, ...]
    samples: Optional[int]  # from sizes.json beside them (the write stage's), else None

    @property
    def count(self) -> int:
        return len(self.paths)


def shards_in(directory: str) -> Shards:
    """The `*.tar` of a directory (the write stage's `pruned/`) as one --train-data pattern:
    `DIR/{00000..00006}.tar` when the names are consecutive numbers of one width, else
    `DIR/{a,b,c}.tar`. The sample count comes from `sizes.json` where it lists every tar."""
    directory = os.path.abspath(directory)
    if any(c in directory for c in "{},") or "::" in directory:
        raise ValueError(f"{directory}: braces, commas and '::' mean something in a --train-data pattern")
    paths = sorted(glob.glob(os.path.join(glob.escape(directory), "*.tar")))
    if not paths:
        raise FileNotFoundError(f"no .tar shards in {directory}")
    stems = [os.path.basename(p)[:-len(".tar")] for p in paths]
    if any(c in s for s in stems for c in "{},") or any("::" in s for s in stems):
        raise ValueError(f"{directory}: a shard name holds a brace, a comma or '::'")
    if len(stems) == 1:
        pattern = paths[0]
    elif all(re.fullmatch(r"\d+", s) and len(s) == len(stems[0]) for s in stems) and \
            [int(s) for s in stems] == list(range(int(stems[0]), int(stems[0]) + len(stems))):
        pattern = os.path.join(directory, f"{{{stems[0]}..{stems[-1]}}}.tar")
    else:
        pattern = os.path.join(directory, "{" + ",".join(stems) + "}.tar")
    samples = None
    sizes_path = os.path.join(directory, "sizes.json")
    if os.path.exists(sizes_path):
        with open(sizes_path) as f:
            sizes = json.load(f)
        if all(os.path.basename(p) in sizes for p in paths):
            samples = sum(int(sizes[os.path.basename(p)]) for p in paths)
    return Shards(pattern=pattern, paths=tuple(paths), samples=samples)


def count_trainable(paths: Sequence[str]) -> int:
    """Samples open_clip_train would train on in these tars: keys (the member path up to the first dot
    of its file name, as webdataset's) with a `.txt` and an image member. Reads the tar headers only."""
    import tarfile

    total = 0
    for path in paths:
        exts: dict[str, set] = {}
        with tarfile.open(path) as tar:
            for info in (i for i in tar if i.isfile() and "." in os.path.basename(i.name)):
                head, base = os.path.split(info.name)
                stem, ext = base.split(".", 1)
                exts.setdefault(os.path.join(head, stem), set()).add(ext.lower())
        # open_clip_train's filter_no_caption_or_no_image: a caption and an image of these extensions
        total += sum(1 for e in exts.values() if schema.CAPTION_MEMBER in e and e & {"jpg", "jpeg", "png", "webp"})
    return total


def train_argv(train_data: str, plan: SamplesPlan, logs: str, name: str, model: str, seed: int = 0,
               lr: float = 1e-3, warmup: Optional[int] = None, wd: float = 0.2, workers: int = 0,
               resampled: bool = False, keep_checkpoints: bool = False, log_every: int = 10,
               extra: Sequence[str] = ()) -> list[str]:
    """The argv of `open_clip_train.main.main` (what `python -m open_clip_train.main` takes) for a
    fresh model trained on CPU for `plan.samples_seen` samples.

    On CPU: `--device cpu`, `--precision fp32` (the default `amp` autocasts to fp16, meant for
    CUDA); no wandb/tensorboard (`--report-to ''`); `--warmup` set (its default, 10,000 steps, would
    leave a short run warming up throughout); `--resume latest`, so the same argv again picks up the
    newest checkpoint of `logs/name` (and a finished run returns at once); without it a second
    start with the same `--name` refuses ("Experiment already exists") and returns -1.
    """
    if warmup is None:
        warmup = max(1, plan.steps // 10)
    argv = [
        "--train-data", train_data, "--dataset-type", "webdataset",
        "--train-num-samples", str(plan.train_num_samples), "--epochs", str(plan.epochs),
        "--batch-size", str(plan.batch_size), "--workers", str(workers), "--model", model,
        "--device", "cpu", "--precision", "fp32",
        "--lr", repr(float(lr)), "--wd", repr(float(wd)), "--warmup", str(int(warmup)), "--seed", str(int(seed)),
        "--logs", os.path.abspath(logs), "--name", name, "--resume", "latest", "--save-frequency", "1",
        "--report-to", "", "--log-every-n-steps", str(max(1, int(log_every))),
    ]
    if resampled:
        argv.append("--dataset-resampled")
    if not keep_checkpoints:
        argv.append("--delete-previous-checkpoint")
    return argv + list(extra)


# The child process: register the config, pin the threads, reseed every epoch, then open_clip's
# own trainer. argv: [json spec, *open_clip_train argv]. Exit code: 0 done, 3 refused (main
# returned -1, e.g. an existing run without --resume latest), else the exception's.
LAUNCHER = r"""
import json, random, sys
spec = json.loads(sys.argv[1])
import torch
torch.set_num_threads(spec["threads"])
import open_clip
open_clip.add_model_config(spec["config_dir"])
import webdataset
import open_clip_train.main as M
if spec.get("epoch_seed") is not None:
    rng = random.Random(spec["epoch_seed"])
    _shuffle = webdataset.shuffle
    def _seeded_shuffle(*args, **kwargs):
        kwargs.setdefault("rng", rng)
        return _shuffle(*args, **kwargs)
    webdataset.shuffle = _seeded_shuffle
    _train_one_epoch = M.train_one_epoch
    def _reseeded_epoch(model, data, loss, epoch, *args, **kwargs):
        seed = spec["epoch_seed"] * 100003 + epoch
        rng.seed(seed)
        M.random_seed(seed, 0)
        return _train_one_epoch(model, data, loss, epoch, *args, **kwargs)
    M.train_one_epoch = _reseeded_epoch
result = M.main(sys.argv[2:])
sys.exit(3 if result == -1 else 0)
"""
LAUNCH_REFUSED = 3


def launch_command(python: str, config_dir: str, argv: Sequence[str], threads: int = 1,
                   epoch_seed: Optional[int] = 0) -> list[str]:
    """`python -c LAUNCHER SPEC ARGV...`: open_clip_train.main.main in a process of its own.

    `epoch_seed` makes a run reproducible and its resumption exact (with `--workers 0`): open_clip_train
    builds webdataset's sample-shuffle buffer without a generator (webdataset then seeds it from the
    pid and the clock) and seeds torch (the augmentations) once per process, so a resumed run would
    see other orders and crops than an uninterrupted one. With it, the launcher hands the shuffle a
    generator and reseeds it and torch/numpy/random at the start of every epoch from
    (epoch_seed, epoch); the shard order (`detshuffle2`, --seed + epoch) and the model init (--seed)
    are open_clip_train's own. None leaves open_clip_train's randomness untouched.
    """
    spec = {"config_dir": os.path.abspath(config_dir), "threads": int(threads), "epoch_seed": epoch_seed}
    return [python, "-P", "-c", LAUNCHER, json.dumps(spec), *argv]  # -P: the cwd not on sys.path


def child_env(base: Mapping[str, str], threads: int = 1) -> dict:
    """The launcher's environment: no variable that would make open_clip_train a rank of a
    distributed job, no GPU, and the thread pools pinned."""
    env = {k: v for k, v in base.items() if k not in _DISTRIBUTED_ENV}
    env.update({k: str(int(threads)) for k in _THREAD_ENV})
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONUNBUFFERED"] = "1"
    return env


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32)."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# --- zero-shot classification --------------------------------------------------------------------

def class_prompts(name: str, templates: Sequence[str] = ZERO_SHOT_TEMPLATES) -> list[str]:
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return [t.format(a=f"{article} {name}", n=name) for t in templates]


def zero_shot_weights(encode_text: Callable[[list[str]], np.ndarray], class_names: Sequence[str],
                      templates: Sequence[str] = ZERO_SHOT_TEMPLATES) -> np.ndarray:
    """[C, D]: per class, the mean of its prompts' unit text embeddings, renormalized (CLIP's prompt
    ensembling, as open_clip's `build_zero_shot_classifier`)."""
    rows = []
    for name in class_names:
        emb = unit(encode_text(class_prompts(name, templates)))
        rows.append(emb.mean(0))
    return unit(np.stack(rows))


def zero_shot_predict(image_features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The class whose ensembled prompt embedding is nearest (cosine) to each image embedding."""
    return np.asarray(unit(image_features) @ weights.T).argmax(axis=1)


def class_scores(pred: np.ndarray, labels: np.ndarray, n_classes: int, worst_k: int = 3) -> dict:
    """Accuracy, balanced accuracy (the mean of per-class accuracies, over the classes present) and
    the mean accuracy of the `worst_k` worst classes, plus the per-class accuracies."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    if len(labels) == 0:
        nan = float("nan")
        return {ACCURACY: nan, BALANCED_ACCURACY: nan, WORST_ACCURACY: nan, "per_class": []}
    per_class = [float(np.mean(pred[labels == c] == c)) if (labels == c).any() else float("nan")
                 for c in range(n_classes)]
    present = np.array([a for a in per_class if not math.isnan(a)])
    return {ACCURACY: float(np.mean(pred == labels)), BALANCED_ACCURACY: float(present.mean()),
            WORST_ACCURACY: float(np.sort(present)[:worst_k].mean()), "per_class": per_class}


# --- retrieval -----------------------------------------------------------------------------------

def caption_groups(captions: Sequence[str]) -> np.ndarray:
    """One id per distinct caption text: pairs whose captions are the same text match each other
    (a test set of demo captions repeats texts, and an image cannot tell which copy was its own)."""
    ids: dict[str, int] = {}
    return np.array([ids.setdefault(c, len(ids)) for c in captions], np.int64)


def retrieval_recall(image_features: np.ndarray, text_features: np.ndarray, ks: Sequence[int] = (1, 5),
                     groups: Optional[np.ndarray] = None) -> dict:
    """Recall@k of held-out pairs (image i with text i), both ways. Texts of one group (`caption_groups`:
    the same caption text; default: every text its own) are one candidate: image->text is the share of
    images whose own group is among the k groups nearest to it (a group as near as its nearest text);
    text->image the share of texts with an image of their group among their k nearest images.
    Keys `image_to_text_R@k`, `text_to_image_R@k` and `mean_R@k` (the two's mean)."""
    img, txt = unit(image_features), unit(text_features)
    n = len(img)
    if len(txt) != n or n == 0:
        raise ValueError(f"{n} images and {len(txt)} texts: retrieval needs pairs")
    groups = np.arange(n) if groups is None else np.asarray(groups)
    sim = img @ txt.T  # [image, text]
    order = np.argsort(groups, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(groups[order]) != 0])
    group_ids = groups[order][starts]
    group_sim = np.maximum.reduceat(sim[:, order], starts, axis=1)  # [image, group]
    own = np.searchsorted(group_ids, groups)  # each image's own group, as a column of group_sim
    out = {}
    for k in ks:
        top_g = np.argsort(-group_sim, axis=1, kind="stable")[:, :min(int(k), len(group_ids))]
        i2t = float(np.mean((top_g == own[:, None]).any(axis=1)))
        top_i = np.argsort(-sim.T, axis=1, kind="stable")[:, :min(int(k), n)]  # per text, its k nearest images
        t2i = float(np.mean((groups[top_i] == groups[:, None]).any(axis=1)))
        out[f"image_to_text_R@{k}"], out[f"text_to_image_R@{k}"], out[f"mean_R@{k}"] = i2t, t2i, (i2t + t2i) / 2
    return out


# --- held-out Fashion-MNIST data -----------------------------------------------------------------

def fmnist_test_images(count: Optional[int] = None, seed: int = 0, root: Optional[str] = None):
    """(uint8 images [N, 28, 28], labels [N]) of the t10k split: all, or `count` of them, a seeded
    class-stratified draw (every class equally often, up to rounding)."""
    from prune.demo.fashion_mnist import DEFAULT_ROOT, load_fashion_mnist

    images, labels = load_fashion_mnist("test", root or DEFAULT_ROOT)
    if count is None or count >= len(labels):
        return images, labels
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = [count // len(classes) + (1 if i < count % len(classes) else 0) for i in range(len(classes))]
    idx = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), n, replace=False)
                                  for c, n in zip(classes, per)]))
    return images[idx], labels[idx]


def fmnist_retrieval_pairs(images: np.ndarray, labels: np.ndarray, seed: int = 0) -> list[str]:
    """A describing caption for each held-out image (prune/demo/captions.py `describe`: a class noun
    or synonym, tone and texture from its pixels, a shop-style template), seeded."""
    from prune.demo.captions import describe

    rng = np.random.default_rng(seed)
    return [describe(int(y), x, rng) for x, y in zip(images, labels)]
