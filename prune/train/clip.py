"""CLIP training pieces: open_clip's own model, tokenizer and contrastive loss, the checkpoint
directory open_clip loads, and the shipped model's training images.

Pure torch + open_clip, no Ray: the stage in `pipelines/stages/train_clip.py` runs `fit` in one
process and writes the directory with `save_clip`; the tests drive them directly. The directory
is open_clip's own layout (`open_clip_config.json` with `model_cfg` and `preprocess_cfg`, and
`open_clip_model.safetensors`), so `open_clip.create_model("local-dir:DIR")` loads it, and so
does the open_clip backend (`embed.pretrained=DIR`). `train_clip.json` beside them is ours: the
training settings, steps, losses and the data used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from typing import Optional

import numpy as np

from prune.embed.backends.open_clip_backend import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, weights_sha256
from prune.embed.checkpoints import save_tensors
from prune.train.clip_settings import ClipModelConfig, ClipTrainConfig

log = logging.getLogger("ssl_prune")

RECORD_FILE = "train_clip.json"  # ours, written last: its presence (and fingerprint) marks a complete directory
LOGIT_SCALE_MAX = math.log(100)  # open_clip's trainer clamps the learned temperature there


def build_clip(model: ClipModelConfig, init_logit_scale: float = math.log(1 / 0.07)):
    """open_clip's CLIP from the section's model_cfg: what create_model("local-dir:") builds from it."""
    import open_clip

    return open_clip.CLIP(**model.model_cfg(), init_logit_scale=init_logit_scale)


def tokenizer(model: ClipModelConfig):
    """open_clip's own tokenizer for this model_cfg (its default: CLIP's BPE, cut at context_length)."""
    import open_clip

    return open_clip.get_tokenizer(context_length=model.text.context_length)


def param_groups(model, weight_decay: float) -> list[dict]:
    """open_clip's trainer's rule: no weight decay on gains, biases, norms and the logit scale."""
    def exclude(name, p):
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay}]


def fit(model, pixels, tokens, train: ClipTrainConfig, spec, device: str, precision: str,
        log_every: int = 50) -> dict:
    """Train `model` on (uint8 NHWC crops, token ids) pairs with open_clip's ClipLoss; returns the
    loop's record (steps, epochs, per-epoch loss and logit scale, final loss)."""
    import open_clip
    import torch

    from prune.train.ssl import augment, lr_at

    n, bs = len(pixels), train.batch_size
    steps_per_epoch = n // bs
    if steps_per_epoch < 1:
        raise ValueError(f"{n} image-caption pairs, fewer than one batch (train.batch_size {bs})")
    total = min(train.max_steps or 1 << 62, train.epochs * steps_per_epoch)
    model = model.to(device).train()
    opt = torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.ClipLoss()
    order_g = torch.Generator().manual_seed(train.seed)
    view_g = torch.Generator(device=device).manual_seed(train.seed + 1)
    history: list[dict] = []
    step = epoch = 0
    t_log = time.time()
    while step < total:
        order, losses = torch.randperm(n, generator=order_g), []
        for b in range(steps_per_epoch):
            idx = order[b * bs : (b + 1) * bs]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, train.lr, train.warmup_steps)
            x = augment(pixels[idx].to(device), train.augment, spec.size, spec.mean, spec.std, view_g)
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                image_features, text_features, scale = model(x, tokens[idx].to(device))
            loss = loss_fn(image_features.float(), text_features.float(), scale.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
            losses.append(loss.item())
            step += 1
            if step % log_every == 0:
                rate = log_every * bs / (time.time() - t_log)
                log.info("step %d/%d epoch %d loss %.4f logit scale %.1f %.0f pairs/s", step, total, epoch,
                         float(np.mean(losses[-log_every:])), float(model.logit_scale.detach().exp()), rate)
                t_log = time.time()
            if step >= total:
                break
        history.append({"epoch": epoch, "step": step, "loss": float(np.mean(losses)),
                        "logit_scale": round(float(model.logit_scale.detach().exp()), 4)})
        epoch += 1
    return {"steps": step, "epochs": epoch, "loss": history[-1]["loss"], "history": history}


def save_clip(path: str, model, model_cfg: ClipModelConfig, dtype: str = "float16",
              used_tokens: Optional[np.ndarray] = None) -> dict:
    """The checkpoint directory open_clip loads: weights, then open_clip_config.json. With
    `used_tokens` (the token ids the training captions held), every other row of the token
    embedding is saved as zeros (their trained value is their random init). -> what was written."""
    import torch

    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().to("cpu", getattr(torch, dtype), copy=True) for k, v in model.state_dict().items()}
    zeroed = 0
    if used_tokens is not None:  # (a copy: the model keeps its rows)
        emb = state["token_embedding.weight"]
        unused = torch.ones(emb.shape[0], dtype=torch.bool)
        unused[torch.as_tensor(np.asarray(used_tokens), dtype=torch.long)] = False
        emb[unused] = 0
        zeroed = int(unused.sum())
    weights = os.path.join(path, OPEN_CLIP_WEIGHTS)
    save_tensors(weights, state)
    _write_json(os.path.join(path, OPEN_CLIP_CONFIG),
                {"model_cfg": model_cfg.model_cfg(), "preprocess_cfg": model_cfg.preprocess_cfg()})
    return {"weights": OPEN_CLIP_WEIGHTS, "weights_sha256": weights_sha256(weights), "dtype": dtype,
            "bytes": os.path.getsize(weights), "unused_token_rows_zeroed": zeroed,
            "parameters": int(sum(p.numel() for p in model.parameters()))}


def write_record(path: str, record: dict) -> None:
    """train_clip.json, written last and atomically."""
    _write_json(os.path.join(path, RECORD_FILE), record)


def read_record(path: str) -> Optional[dict]:
    """The directory's train_clip.json, or None when there is none (or it is unreadable)."""
    try:
        with open(os.path.join(path, RECORD_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, obj: dict) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# --- the shipped model's data: Fashion-MNIST train images that no evaluation pool draws -----------

CLIP_POOL_FILE = "clip_pool.json"  # beside the shards write_clip_shards makes: what they hold and why


def web_like_train_indices(labels: np.ndarray, count: int, seed: int = 0, **options) -> np.ndarray:
    """The train images `write_web_like_shards(count=count, seed=seed, **options)` draws (its
    originals; its copies are altered originals, its junk is drawn from nothing): the same plan
    and the same first draws of its generator. tests/test_train_clip.py checks it on a real pool."""
    from prune.demo import web_like
    from prune.demo.fashion_mnist import CLASS_NAMES
    from prune.demo.shards import MAX_SHARD_SIZE

    args = {"imbalance": web_like.DEFAULT_IMBALANCE, "copy_share": web_like.DEFAULT_COPY_SHARE,
            "junk_share": web_like.DEFAULT_JUNK_SHARE, "popular": None, "copy_exponent": web_like.DEFAULT_COPY_EXPONENT}
    args |= options
    plan = web_like._plan(count=count, shard_size=MAX_SHARD_SIZE, **args)
    rng = np.random.default_rng(seed)
    ranked = rng.permutation(len(CLASS_NAMES))
    drawn = [rng.choice(np.flatnonzero(labels == ranked[rank]), size, replace=False)
             for rank, size in enumerate(plan["class_sizes"])]
    return np.sort(np.concatenate(drawn))


def evaluation_train_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """The train images each shipped evaluation pool (and the demo) draws, by the recipes their
    configs give. The abundant pool of configs/evaluate_fmnist.yaml is the whole split: no image is
    outside it, so it is not listed; its scarce pool is."""
    from prune.evaluate.labels import draw_pool

    order = np.random.default_rng(0).permutation(len(labels))  # write_demo_shards(seed=0): row i is image order[i]
    return {
        "configs/evaluate_web.yaml: demo-data --web-like --count 20000": web_like_train_indices(labels, 20000, 0),
        "configs/evaluate_fmnist.yaml: evaluate.pool_size=5000 of demo-data --count 60000":
            np.sort(order[draw_pool(len(labels), 5000, 0)]),
        "scripts/demo.sh: demo-data --count 4000": np.sort(order[:4000]),
    }


def clip_train_indices(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """`per_class` train images of every class (seeded), none of which an evaluation pool draws."""
    used = np.unique(np.concatenate(list(evaluation_train_indices(labels).values())))
    free = np.setdiff1d(np.arange(len(labels)), used)
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        pool = free[labels[free] == c]
        if len(pool) < per_class:
            raise ValueError(f"class {c}: {len(pool)} train images outside the evaluation pools, fewer than {per_class}")
        picked.append(rng.choice(pool, per_class, replace=False))
    return np.sort(np.concatenate(picked))


def indices_sha256(indices: np.ndarray) -> str:
    return hashlib.sha256(np.sort(np.asarray(indices, np.int64)).tobytes()).hexdigest()


def write_clip_shards(out_dir: str, per_class: int = 1700, shard_size: int = 2000, seed: int = 0) -> dict:
    """img2dataset-layout shards of `clip_train_indices`, each image with a describing caption from
    prune/demo/captions.py (class nouns and synonyms, tone and texture from its pixels, varied
    templates); -> the summary written beside them (CLIP_POOL_FILE)."""
    from prune.demo.captions import describe
    from prune.demo.fashion_mnist import CLASS_NAMES, load_fashion_mnist
    from prune.demo.shards import PARQUET_SCHEMA, encode_image, sample_key, uid_for, write_shard_files

    images, labels = load_fashion_mnist("train")
    chosen = clip_train_indices(labels, per_class, seed)
    order = np.random.default_rng(seed).permutation(chosen)  # classes mixed across shards
    os.makedirs(out_dir, exist_ok=True)
    tars = []
    for shard, first in enumerate(range(0, len(order), shard_size)):
        start_time, members, rows = time.time(), [], []
        for i, index in enumerate(order[first : first + shard_size].tolist()):
            key, label = sample_key(shard, i), int(labels[index])
            caption = describe(label, images[index], np.random.default_rng([seed, index]))
            image = encode_image(images[index])
            url = f"https://example.invalid/fmnist/train/{index}.jpg"
            meta = {"key": key, "uid": uid_for(url, caption), "url": url, "caption": caption, "status": "success",
                    "error_message": None, "width": 28, "height": 28, "original_width": 28, "original_height": 28,
                    "exif": None, "sha256": hashlib.sha256(image).hexdigest(), "label": label, "label_name": CLASS_NAMES[label], "index": index}
            members += [(f"{key}.jpg", image), (f"{key}.txt", caption.encode()), (f"{key}.json", json.dumps(meta).encode())]
            rows.append(meta)
        tars.append(write_shard_files(out_dir, shard, members, rows, PARQUET_SCHEMA, start_time))
    summary = {
        "source": "Fashion-MNIST train split", "images": len(chosen), "per_class": per_class, "seed": seed,
        "indices_sha256": indices_sha256(chosen), "shards": [os.path.basename(t) for t in tars],
        "captions": "prune.demo.captions.describe(label, pixels, numpy.random.default_rng([seed, index]))",
        "disjoint_from": {name: len(ix) for name, ix in evaluation_train_indices(labels).items()},
    }
    _write_json(os.path.join(out_dir, CLIP_POOL_FILE), summary)
    return summary
