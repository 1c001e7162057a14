"""The fixed classifiers `evaluate` trains on each kept subset: a linear probe and a small CNN."""

from __future__ import annotations

import math
import time

import numpy as np

from prune.cluster.kmeans import l2_normalize
from prune.evaluate.layout import (
    ACCURACY,
    BALANCED_ACCURACY,
    N_TEST,
    N_TRAIN,
    STEPS,
    TRAIN_SECONDS,
    WORST3_ACCURACY,
)
from prune.evaluate.settings import CnnConfig, LinearProbeConfig

# The CNN's architecture version, part of every CNN row's fingerprint: results of another
# architecture are never reused (2: the dense head of `small_cnn`).
CNN_VERSION = 2


def _cosine_lambda(total_steps: int):
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


def train_steps(n_train: int, batch_size: int, epochs: int, min_steps: int) -> int:
    """`epochs` passes (full batches only), and never fewer than `min_steps` updates."""
    per_epoch = max(1, n_train // max(1, min(batch_size, n_train)))
    return max(epochs * per_epoch, min_steps, 1)


def _fit(model, batch_inputs, labels: np.ndarray, steps: int, batch_size: int, lr: float, weight_decay: float,
         seed: int) -> None:
    """Adam with cosine decay over `steps` minibatches, reshuffled every pass; all randomness seeded.

    `batch_inputs(idx, gen)` gives the model's input for those rows; `gen` (None when scoring)
    is the generator any augmentation must draw from, so a seed gives one result.
    """
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    y_all = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    n = len(y_all)
    bs = min(batch_size, n)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine_lambda(steps))
    order, pos = torch.randperm(n, generator=gen), 0
    model.train()
    for _ in range(steps):
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + bs]
        pos += bs
        x = batch_inputs(idx.numpy(), gen)
        loss = F.cross_entropy(model(x), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def _predict(model, batch_inputs, n: int, batch_size: int = 1024) -> np.ndarray:
    import torch

    model.eval()
    preds = []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            idx = np.arange(start, min(start + batch_size, n))
            preds.append(model(batch_inputs(idx, None)).argmax(dim=1).numpy())
    return np.concatenate(preds) if preds else np.zeros(0, np.int64)


def scores(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> dict:
    """Accuracy, balanced accuracy (mean of per-class accuracies) and the mean of the 3 worst classes."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        return {ACCURACY: float("nan"), BALANCED_ACCURACY: float("nan"), WORST3_ACCURACY: float("nan")}
    per_class = np.array([np.mean(pred[labels == c] == c) for c in range(n_classes) if (labels == c).any()])
    return {ACCURACY: float(np.mean(pred == labels)), BALANCED_ACCURACY: float(per_class.mean()),
            WORST3_ACCURACY: float(np.sort(per_class)[:3].mean())}


def _trainable(train_x, train_y):
    """The kept samples a classifier can learn from: junk (label -1) is kept, costs budget, teaches nothing."""
    has_class = np.asarray(train_y) >= 0
    return train_x[has_class], np.asarray(train_y)[has_class]


def standardize(train_pool: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Unit-norm features, centred and scaled by the pool's statistics (the same for every subset)."""
    pool = l2_normalize(train_pool)
    mean, std = pool.mean(axis=0), pool.std(axis=0) + 1e-6
    return [((x - mean) / std).astype(np.float32) for x in (pool, *(l2_normalize(o) for o in others))]


def _nothing_kept(test_y) -> dict:
    """A selection that keeps no sample (e.g. a tiny fraction of tiny clusters): no classifier, no score."""
    return {ACCURACY: float("nan"), BALANCED_ACCURACY: float("nan"), WORST3_ACCURACY: float("nan"), STEPS: 0,
            TRAIN_SECONDS: 0.0, N_TRAIN: 0, N_TEST: len(test_y)}


def train_linear_probe(train_x, train_y, test_x, test_y, n_classes: int, cfg: LinearProbeConfig, seed: int) -> dict:
    """The linear probe (prune/evaluate/probes.py) on the kept subset only; features standardized by the pool.

    Solved to convergence from zero weights: deterministic, so `seed` changes nothing here.
    """
    from prune.evaluate.probes import linear_probe

    n_kept = len(train_y)
    train_x, train_y = _trainable(train_x, train_y)
    if len(train_y) == 0:
        return _nothing_kept(test_y) | {N_TRAIN: n_kept}
    t0 = time.perf_counter()
    pred = linear_probe(train_x, train_y, test_x, cfg.weight_decay, cfg.max_iter, n_classes, standardize=False)
    return scores(pred, test_y, n_classes) | {STEPS: cfg.max_iter, TRAIN_SECONDS: round(time.perf_counter() - t0, 3),
                                              N_TRAIN: n_kept, N_TEST: len(test_y)}


def small_cnn(n_classes: int, width: int, in_channels: int = 3):
    """conv(w/2) pool conv(w) pool conv(2w) pool, each conv + BN + ReLU, then a 128-unit dense layer
    (dropout 0.3) over the 3x3 map.

    The dense head keeps where a feature is (a global average pool threw it away and capped the
    net at 86% on the clean 60k); the full-resolution layer stays the narrow one: ~2.5M
    multiply-adds per 28x28 image at width 32; on the clean 60k in 4,000 steps of 128, 91.1% from
    the raw images, 90.7% from the demo's JPEG shards.
    """
    import torch.nn as nn

    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    stem = max(1, width // 2)
    return nn.Sequential(
        *block(in_channels, stem), nn.MaxPool2d(2),
        *block(stem, width), nn.MaxPool2d(2),
        *block(width, 2 * width), nn.AdaptiveMaxPool2d(3), nn.Flatten(),
        nn.Linear(2 * width * 9, 128), nn.ReLU(inplace=True), nn.Dropout(0.3), nn.Linear(128, n_classes),
    )


def pixels_to_tensor(pixels_uint8: np.ndarray):
    """uint8 NHWC -> float NCHW in [-1, 1], channels-last in memory (the fast conv layout on CPU)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(pixels_uint8)).permute(0, 3, 1, 2)
    return x.float().div_(127.5).sub_(1.0)


def shift_and_flip(pixels_uint8: np.ndarray, gen, max_shift: int = 2) -> np.ndarray:
    """Light augmentation on the uint8 batch: a random horizontal flip and a shift of up to
    `max_shift` pixels per image (edges repeated). A slice per image: cheap beside the CNN."""
    import torch

    b, h, w = pixels_uint8.shape[:3]
    flip = (torch.rand(b, generator=gen) < 0.5).numpy()
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=gen).numpy()
    padded = np.pad(pixels_uint8, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)), mode="edge")
    out = np.empty_like(pixels_uint8)
    for i in range(b):
        crop = padded[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop[:, ::-1] if flip[i] else crop
    return out


def train_cnn(train_pixels, train_y, test_pixels, test_y, n_classes: int, cfg: CnnConfig, seed: int) -> dict:
    """The small CNN on pixels: exactly `cfg.steps` steps when set (every subset trained alike, CCS's
    protocol), else `cfg.epochs` passes over the kept subset and at least `cfg.min_steps` steps."""
    import torch

    n_kept = len(train_y)
    train_pixels, train_y = _trainable(train_pixels, train_y)
    if len(train_y) == 0:
        return _nothing_kept(test_y) | {N_TRAIN: n_kept}
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = small_cnn(n_classes, cfg.width, train_pixels.shape[-1]).to(memory_format=torch.channels_last)
    steps = cfg.steps or train_steps(len(train_y), cfg.batch_size, cfg.epochs, cfg.min_steps)

    def inputs(pixels):
        def batch(idx, gen):
            raw = pixels[idx]
            return pixels_to_tensor(shift_and_flip(raw, gen) if gen is not None and cfg.augment else raw)
        return batch

    _fit(model, inputs(train_pixels), train_y, steps, cfg.batch_size, cfg.lr, 0.0, seed)
    fit_s = time.perf_counter() - t0
    pred = _predict(model, inputs(test_pixels), len(test_y), batch_size=512)
    return scores(pred, np.asarray(test_y), n_classes) | {STEPS: steps, TRAIN_SECONDS: round(fit_s, 3),
                                                          N_TRAIN: n_kept, N_TEST: len(test_y)}
