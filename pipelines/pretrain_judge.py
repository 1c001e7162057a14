"""The pretraining judge (design.md section 6; issue 23, part 4): train a fresh small CLIP with
open_clip's own trainer (`open_clip_train.main.main`, what `python -m open_clip_train.main` runs)
on a policy's pruned shards for a fixed number of samples seen, then score the checkpoint:
zero-shot accuracy on held-out images with class-name prompts, balanced and worst-3 accuracy, and
image-text retrieval recall@1/5 on held-out pairs.

The trainer runs in a process of its own (prune/evaluate/pretrain.py's LAUNCHER via `python -c`):
its logging setup (it adds handlers to the root logger and sets every logger to INFO) and any
crash stay there. It is always started with `--resume latest`, so starting the same run again
(same `name` under the same `logs`) continues from its newest complete epoch, and a finished run
is not trained again.

`ssl-prune evaluate` runs it per subset and seed (classifier `clip`, pipelines/judge_tasks.py);
`python -m pipelines.pretrain_judge SHARDS WORKDIR` runs it on one directory of shards (`main`).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

from prune.evaluate import pretrain as P

log = logging.getLogger("ssl_prune")

RESULT_FILE = "judge.json"  # beside the run's logs: settings, plan, timings, metrics


@dataclass
class JudgeSettings:
    samples_seen: int = 5000  # the same for every subset (DataComp's fixed compute)
    batch_size: int = 50
    epochs: int = 5  # open_clip_train epochs of samples_seen / epochs each: the checkpoints, i.e. the resume points
    lr: float = 2e-3
    warmup: Optional[int] = None  # steps; None: a tenth of them
    wd: float = 0.2
    seed: int = 0
    workers: int = 0  # dataloader processes (0: decode in the trainer's process)
    threads: int = 1  # torch / OpenMP threads of the trainer (2 on 2 busy cores ran 5-15x slower: OpenMP spins)
    resampled: bool = False  # --dataset-resampled: shards drawn with replacement (DataComp) instead of passes
    epoch_seed: Optional[int] = 0  # reseed the sample shuffle and torch every epoch (None: open_clip's own randomness)
    keep_checkpoints: bool = False  # keep every epoch's checkpoint (else only the newest)
    timeout_s: Optional[float] = None  # kill the trainer after this long (it resumes on the next call)
    model: dict = field(default_factory=P.tiny_clip_config)  # an open_clip model config
    eval_batch_size: int = 500

    def plan(self) -> P.SamplesPlan:
        return P.samples_seen_plan(self.samples_seen, self.batch_size, self.epochs, self.workers)


@dataclass
class TrainResult:
    checkpoint: str
    model_name: str
    config_dir: str
    plan: dict
    argv: list
    seconds: float  # wall time of this call's training (0 when it was already done)
    resumed_from_epoch: int  # the newest complete epoch found before starting (0: a fresh run)
    dropped_checkpoints: list  # torn checkpoints deleted before starting
    log_path: str  # the trainer's stdout and stderr (open_clip_train writes its own out.log too)
    subset_samples: int  # from sizes.json (else counted); samples_seen / this = passes over the subset
    samples_seen: int  # what the final checkpoint trained on: its optimizer steps * batch size
    logged_samples: dict  # per epoch, what open_clip_train's out.log says it trained on


class TrainerFailed(RuntimeError):
    pass


# --- checkpoints ---------------------------------------------------------------------------------

def checkpoint_dir(logs: str, name: str) -> str:
    return os.path.join(logs, name, "checkpoints")  # where open_clip_train saves epoch_<n>.pt


def final_checkpoint(logs: str, name: str, epochs: int) -> Optional[str]:
    """`logs/<name>/checkpoints/epoch_<epochs>.pt`, the one the last epoch writes, if it is there."""
    path = os.path.join(checkpoint_dir(logs, name), f"epoch_{epochs}.pt")
    return path if os.path.exists(path) else None


def checkpoint_epochs(logs: str, name: str) -> list[int]:
    """The completed epochs with a checkpoint, ascending."""
    names = (os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(checkpoint_dir(logs, name)), "*.pt")))
    return sorted(int(m.group(1)) for m in (re.fullmatch(r"epoch_(\d+)\.pt", n) for n in names) if m)


def read_checkpoint(path: str) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def drop_torn_checkpoints(logs: str, name: str) -> list[str]:
    """Delete the checkpoints that do not load (open_clip_train writes them in place with torch.save,
    so a kill while saving leaves a torn one, which `--resume latest` would pick and fail on for
    ever) -> the deleted paths. Leftovers of other names (tmp.pt) are deleted too."""
    dropped = []
    for path in sorted(glob.glob(os.path.join(glob.escape(checkpoint_dir(logs, name)), "*.pt"))):
        try:
            ckpt = read_checkpoint(path)
            ok = isinstance(ckpt, dict) and "state_dict" in ckpt and "epoch" in ckpt
        except Exception:  # noqa: BLE001 - any failure to load means torn
            ok = False
        if not ok:
            os.remove(path)
            dropped.append(path)
    return dropped


_EPOCH_LINE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+) \(100%\)\]")


def logged_samples_seen(out_log: str) -> dict[int, int]:
    """Per epoch, the samples open_clip_train says it trained on (its last "Train Epoch: e [n/N
    (100%)]" line for that epoch in `logs/<name>/out.log`; a resumed run appends to the same log,
    and an epoch redone after a kill counts once, as its last complete pass)."""
    seen: dict[int, int] = {}
    if os.path.exists(out_log):
        with open(out_log, errors="replace") as f:
            for line in f:
                m = _EPOCH_LINE.search(line)
                if m:
                    seen[int(m.group(1))] = int(m.group(2))
    return dict(sorted(seen.items()))


def optimizer_steps(checkpoint: Mapping) -> int:
    """The optimizer steps a checkpoint's weights went through (AdamW's per-parameter step count)."""
    state = checkpoint["optimizer"]["state"]
    steps = {int(float(s["step"])) for s in state.values() if "step" in s}
    if len(steps) != 1:
        raise ValueError(f"parameters disagree on the step count: {sorted(steps)}")
    return steps.pop()


def state_dict_of(checkpoint: Mapping) -> dict:
    """The model's weights in an open_clip_train checkpoint (DDP's `module.` prefix removed)."""
    sd = checkpoint["state_dict"] if "state_dict" in checkpoint else checkpoint
    if sd and next(iter(sd)).startswith("module."):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def load_trained_clip(checkpoint_path: str, model_name: str, config_dir: str):
    """(model in eval mode, open_clip's eval preprocess, tokenizer) of a checkpoint open_clip_train wrote."""
    import open_clip

    P.register_model_config(config_dir)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None, precision="fp32",
                                                                 device="cpu")
    model.load_state_dict(state_dict_of(read_checkpoint(checkpoint_path)))
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(model_name)


# --- encoding ------------------------------------------------------------------------------------

def encode_images(model, preprocess, images, batch_size: int = 256) -> np.ndarray:
    """Unit image embeddings [N, D]; `images` are PIL images or uint8 arrays (HxW grey or HxWx3),
    each put through open_clip's own eval preprocess (resize, centre crop, RGB, normalize)."""
    import torch
    from PIL import Image

    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im))
                     for im in images[start:start + batch_size]]
            pixels = torch.stack([preprocess(im) for im in batch])
            out.append(model.encode_image(pixels, normalize=True).float().numpy())
    return P.unit(np.concatenate(out)) if out else np.zeros((0, 0), np.float32)


def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 512) -> np.ndarray:
    """Unit text embeddings [N, D] with open_clip's tokenizer (cut at the model's context length)."""
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(list(texts[start:start + batch_size]))
            out.append(model.encode_text(tokens, normalize=True).float().numpy())
    return P.unit(np.concatenate(out)) if out else np.zeros((0, 0), np.float32)


def train_on_shards(shard_dir: str, workdir: str, settings: JudgeSettings, name: str = "run",
                    python: str = sys.executable) -> TrainResult:
    """Train a fresh CLIP with open_clip_train on the tars of `shard_dir` (a write stage's `pruned/`)
    in `workdir/logs/<name>/` -> where its final checkpoint is. Idempotent and resumable: a finished
    run is found and not redone; an interrupted one continues from its newest complete epoch."""
    shards = P.shards_in(shard_dir)
    plan = settings.plan()
    n_samples = shards.samples if shards.samples is not None else P.count_trainable(shards.paths)
    if not settings.resampled and n_samples < settings.batch_size:
        # Without resampling a pass over the subset then yields no full batch (open_clip_train drops
        # partial ones), and webdataset's with_epoch repeats empty passes for ever: the trainer hangs.
        # Resampled shards are one endless stream, batched across shard ends.
        raise ValueError(f"{shard_dir}: {n_samples} samples, fewer than a batch ({settings.batch_size}); "
                         "use resampled=True or a smaller batch")
    config_dir = os.path.join(workdir, "model_config")
    model_name = P.write_model_config(config_dir, settings.model)
    logs = os.path.join(workdir, "logs")
    os.makedirs(logs, exist_ok=True)
    argv = P.train_argv(shards.pattern, plan, logs, name, model_name, seed=settings.seed, lr=settings.lr,
                        warmup=settings.warmup, wd=settings.wd, workers=settings.workers,
                        resampled=settings.resampled, keep_checkpoints=settings.keep_checkpoints)
    result = dict(model_name=model_name, config_dir=config_dir, plan=plan.as_dict(), argv=argv,
                  subset_samples=n_samples)
    _check_fingerprint(os.path.join(logs, name), argv, settings, shards)
    done = final_checkpoint(logs, name, plan.epochs)
    if done is not None:
        return TrainResult(checkpoint=done, seconds=0.0, resumed_from_epoch=plan.epochs, dropped_checkpoints=[],
                           log_path=os.path.join(logs, f"{name}.trainer.log"),
                           **result, **_seen(done, logs, name, settings.batch_size))
    dropped = drop_torn_checkpoints(logs, name)
    before = checkpoint_epochs(logs, name)
    cmd = P.launch_command(python, config_dir, argv, threads=settings.threads, epoch_seed=settings.epoch_seed)
    log_path = os.path.join(logs, f"{name}.trainer.log")
    start = time.time()
    with open(log_path, "a") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, env=P.child_env(os.environ, settings.threads), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=settings.timeout_s)
        except subprocess.TimeoutExpired:
            _kill(proc)
            raise TrainerFailed(f"open_clip_train ran past {settings.timeout_s} s and was killed; "
                                f"calling again resumes from its newest epoch (log: {log_path})")
        except BaseException:
            _kill(proc)  # nothing of it outlives the caller
            raise
    seconds = time.time() - start
    final = final_checkpoint(logs, name, plan.epochs)
    if rc != 0 or final is None:
        why = "refused to start (an existing run under that name)" if rc == P.LAUNCH_REFUSED else f"exit code {rc}"
        raise TrainerFailed(f"open_clip_train {why}, final checkpoint {'found' if final else 'missing'}; "
                            f"log: {log_path}\n{_tail(log_path)}")
    return TrainResult(checkpoint=final, seconds=seconds, resumed_from_epoch=before[-1] if before else 0,
                       dropped_checkpoints=dropped, log_path=log_path, **result,
                       **_seen(final, logs, name, settings.batch_size))


def _kill(proc: subprocess.Popen) -> None:
    """Kill the trainer and its dataloader workers: the process group it leads (start_new_session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


FINGERPRINT_FILE = "judge_fingerprint.json"


def _check_fingerprint(run_dir: str, argv: list, settings: JudgeSettings, shards: P.Shards) -> None:
    """A run directory belongs to one training: the same argv, model, reseeding and shard files
    (names and byte sizes). Resuming or reusing it under other settings would mix two trainings,
    so that raises; the first call writes the fingerprint."""
    fingerprint = {"argv": argv, "model": settings.model, "epoch_seed": settings.epoch_seed,
                   "shards": {os.path.basename(p): os.path.getsize(p) for p in shards.paths}}
    path = os.path.join(run_dir, FINGERPRINT_FILE)
    if os.path.exists(path):
        with open(path) as f:
            if json.load(f) != json.loads(json.dumps(fingerprint)):
                raise ValueError(f"{run_dir} holds a training with other settings or shards ({path}); "
                                 "use another name or workdir, or delete it")
        return
    os.makedirs(run_dir, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(fingerprint, f, indent=1)
    os.replace(tmp, path)


def _seen(checkpoint: str, logs: str, name: str, batch_size: int) -> dict:
    steps = optimizer_steps(read_checkpoint(checkpoint))
    return {"samples_seen": steps * batch_size,
            "logged_samples": logged_samples_seen(os.path.join(logs, name, "out.log"))}


def _tail(path: str, lines: int = 20) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def score_checkpoint(train: TrainResult, test_images, test_labels, class_names: Sequence[str],
                     pair_images, pair_captions: Sequence[str], templates: Sequence[str] = P.ZERO_SHOT_TEMPLATES,
                     eval_batch_size: int = 500, threads: Optional[int] = 1) -> dict:
    """Zero-shot classification of `test_images` (accuracy, balanced, worst 3) with `class_names`
    prompts averaged over `templates`, and recall@1/5 of (`pair_images`, `pair_captions`), in this
    process with `threads` torch threads (set back afterwards; None: leave torch's setting)."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _score(train, test_images, test_labels, class_names, pair_images, pair_captions, templates,
                      eval_batch_size)
    finally:
        torch.set_num_threads(before)


def _score(train, test_images, test_labels, class_names, pair_images, pair_captions, templates, eval_batch_size):
    model, preprocess, tokenizer = load_trained_clip(train.checkpoint, train.model_name, train.config_dir)
    start = time.time()
    encode_text = lambda texts: encode_texts(model, tokenizer, texts, eval_batch_size)  # noqa: E731
    weights = P.zero_shot_weights(encode_text, class_names, templates)
    pred = P.zero_shot_predict(encode_images(model, preprocess, test_images, eval_batch_size), weights)
    zero_shot = P.class_scores(pred, test_labels, len(class_names))
    img = encode_images(model, preprocess, pair_images, eval_batch_size)
    txt = encode_texts(model, tokenizer, pair_captions, eval_batch_size)
    retrieval = P.retrieval_recall(img, txt, (1, 5), groups=P.caption_groups(pair_captions))
    return {"zero_shot": zero_shot, "retrieval": retrieval, "n_test": int(len(test_labels)),
            "n_pairs": int(len(pair_captions)), "logit_scale": float(model.logit_scale.detach().exp()),
            "eval_seconds": time.time() - start}


def judge(shard_dir: str, workdir: str, settings: JudgeSettings, test_images, test_labels,
          class_names: Sequence[str], pair_images, pair_captions: Sequence[str], name: str = "run",
          about_eval: Optional[dict] = None) -> dict:
    """Train (or resume, or find) the run on `shard_dir`, score it, and write `logs/<name>/judge.json`
    (`about_eval`: what the test data were, recorded with the metrics)."""
    train = train_on_shards(shard_dir, workdir, settings, name=name)
    metrics = score_checkpoint(train, test_images, test_labels, class_names, pair_images, pair_captions,
                               eval_batch_size=settings.eval_batch_size, threads=settings.threads)
    record = {"shards": os.path.abspath(shard_dir), "settings": asdict(settings), "train": asdict(train),
              "eval": about_eval or {}, "metrics": metrics}
    path = os.path.join(workdir, "logs", name, RESULT_FILE)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, default=float)
    os.replace(tmp, path)
    return record


def fmnist_judge(shard_dir: str, workdir: str, settings: Optional[JudgeSettings] = None, n_test: Optional[int] = None,
                 n_pairs: int = 1000, seed: int = 0, name: str = "run", captions: str = "describe") -> dict:
    """`judge` on the Fashion-MNIST t10k split: zero-shot on `n_test` images (all 10k by default, else
    a class-stratified draw), retrieval on `n_pairs` t10k images with captions like the pool's:
    "describe" (the web-like pool's describing captions: synonyms, tone, texture, shop templates) or
    "class" (the clean demo shards' "a photo of a <class>"; retrieval then only tells classes apart)."""
    from prune.demo.fashion_mnist import CLASS_NAMES
    from prune.demo.shards import caption_for

    settings = settings or JudgeSettings()
    images, labels = P.fmnist_test_images(None)
    rng = np.random.default_rng(seed)
    pair_idx = np.sort(rng.choice(len(labels), min(n_pairs, len(labels)), replace=False))
    pair_images = images[pair_idx]
    if captions == "describe":
        pair_captions = P.fmnist_retrieval_pairs(pair_images, labels[pair_idx], seed=seed)
    elif captions == "class":
        pair_captions = [caption_for(CLASS_NAMES[int(y)]) for y in labels[pair_idx]]
    else:
        raise ValueError(f"captions must be 'describe' or 'class', got {captions!r}")
    if n_test is not None:
        images, labels = P.fmnist_test_images(n_test, seed=seed)
    return judge(shard_dir, workdir, settings, images, labels, CLASS_NAMES, pair_images, pair_captions, name=name,
                 about_eval={"test": "fashion-mnist t10k", "n_test": n_test, "n_pairs": n_pairs, "seed": seed,
                             "captions": captions})


def main(argv: Optional[Sequence[str]] = None) -> int:
    """python -m pipelines.pretrain_judge SHARDS WORKDIR [SETTINGS_JSON [EVAL_JSON]]: `fmnist_judge` on one
    directory of shards. SETTINGS_JSON overrides JudgeSettings' fields ("model" takes tiny_clip_config's
    arguments), EVAL_JSON fmnist_judge's (n_test, n_pairs, seed, name, captions)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) not in (2, 3, 4):
        print(main.__doc__, file=sys.stderr)
        return 2
    over = json.loads(argv[2]) if len(argv) > 2 else {}
    if "model" in over:
        over["model"] = P.tiny_clip_config(**over["model"])
    record = fmnist_judge(argv[0], argv[1], JudgeSettings(**over), **(json.loads(argv[3]) if len(argv) > 3 else {}))
    t, m = record["train"], record["metrics"]
    print(json.dumps({"train_seconds": t["seconds"], "plan": t["plan"], "subset_samples": t["subset_samples"],
                      "samples_seen": t["samples_seen"], "eval_seconds": m["eval_seconds"], "retrieval": m["retrieval"],
                      "zero_shot": {k: v for k, v in m["zero_shot"].items() if k != "per_class"}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
