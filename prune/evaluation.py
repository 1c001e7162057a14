"""Does the pruning help a learner? Accuracy of classifiers trained on pruned subsets only.

Sorscher et al.'s figure, on a labeled set in our shard format: for every policy and keep
fraction, train a fixed classifier on the kept subset of a pool and score it on the full test
set. Everything here is pure (numpy, torch, faiss; no Ray) so it can be tested piece by piece;
`pipelines/evaluate_stage.py` wires it to the embed stage and runs the trainings as Ray tasks.

The subsets are chosen by `prune.selection`'s own passes, in the select stage's order, so a
row of the table is what `ssl-prune run` with that policy and keep fraction would have kept.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from . import lloyd, schema, selection
from .config import CnnConfig, KMeansConfig, LinearProbeConfig
from .decode import PreprocessSpec, decode_image
from .kmeans import assign, default_k, fit_spherical_kmeans, l2_normalize, prototype_distance
from .shards import TarSample

# --- output layout: <output>/{train,test}/embeddings/ and <output>/pool-<all|N>/ ----------------
TRAIN_DIR = "train"  # the embed stage's output for the pool's shards
TEST_DIR = "test"  # ... and for the test shards
RESULTS_CSV = "results.csv"  # one row per (classifier, policy, keep fraction, seed)
RESULTS_MD = "results.md"  # per classifier: policy x keep fraction, mean ± std over seeds
PLOT_PNG = "accuracy.png"  # accuracy vs keep fraction, one line per policy
SUMMARY_JSON = "summary.json"  # settings, counts, prototypes, timings

# --- results.csv columns, in file order ------------------------------------------------------
POOL, N_POOL, CLASSIFIER, POLICY, KEEP_FRACTION, SEED = "pool", "n_pool", "classifier", "policy", "keep_fraction", "seed"
N_TRAIN, N_TEST, ACCURACY, STEPS, TRAIN_SECONDS = "n_train", "n_test", "accuracy", "steps", "train_seconds"
SHARED_FROM = "shared_from"  # "<policy>@<keep fraction>" whose training (same subset, same seed) this row reuses
FINGERPRINT = "fingerprint"  # settings that made the row: a re-run reuses rows whose fingerprint matches
RESULT_COLUMNS = (POOL, N_POOL, CLASSIFIER, POLICY, KEEP_FRACTION, SEED, N_TRAIN, N_TEST, ACCURACY, STEPS,
                  TRAIN_SECONDS, SHARED_FROM, FINGERPRINT)
_INT_COLUMNS = (N_POOL, SEED, N_TRAIN, N_TEST, STEPS)
_FLOAT_COLUMNS = (KEEP_FRACTION, ACCURACY, TRAIN_SECONDS)

# --- why a sample is left out (besides its embedding status, e.g. undecodable_image) ---------
EXCLUDED_NO_JSON = "no_json_member"
EXCLUDED_BAD_JSON = "unparseable_json"
EXCLUDED_NO_LABEL = "missing_label"
EXCLUDED_BAD_LABEL = "non_integer_label"  # not an integer >= 0 (a float 3.0 or the string "3" pass)
EXCLUDED_NOT_IN_TAR = "not_in_tar"  # embedded, but the tar no longer holds it (changed since)

LINEAR, CNN = "linear", "cnn"
SEED_FREE = (LINEAR,)  # solved to convergence from zero weights: one training serves every seed
BALANCED_PREFIX = "balanced-"
LABEL_MEMBER = "json"


def fraction_label(f: float) -> str:
    """0.1 -> "0.1", 1 -> "1.0": how a keep fraction is written in tables, tags and the plot."""
    text = f"{float(f):g}"
    return text if "." in text or "e" in text else text + ".0"


def pool_label(pool_size: Optional[int]) -> str:
    return "all" if pool_size is None else str(pool_size)


def pool_dir(pool_size: Optional[int]) -> str:
    return f"pool-{pool_label(pool_size)}"


# --- labels ----------------------------------------------------------------------------------


def parse_label(data: Optional[bytes], label_field: str) -> tuple[Optional[int], Optional[str]]:
    """A sample's `.json` member -> (label, None) or (None, why it has no usable label)."""
    if data is None:
        return None, EXCLUDED_NO_JSON
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None, EXCLUDED_BAD_JSON
    if not isinstance(meta, dict) or meta.get(label_field) is None:
        return None, EXCLUDED_NO_LABEL
    value = meta[label_field]
    if isinstance(value, str) and value.strip().isdecimal():
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None, EXCLUDED_BAD_LABEL
    return value, None


@dataclass
class LabeledSet:
    """Usable samples (ok embedding, integer label, decodable image when pixels are wanted)."""

    shards: np.ndarray  # object [n]: input shard id
    keys: np.ndarray  # object [n]
    labels: np.ndarray  # int64 [n]
    embeddings: np.ndarray  # float32 [n, d], unit norm
    pixels: Optional[np.ndarray]  # uint8 [n, s, s, 3], or None when no classifier needs them
    excluded: Counter = field(default_factory=Counter)  # reason -> samples left out
    shard_failures: dict = field(default_factory=dict)  # shard -> why it yielded no sample

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: np.ndarray) -> "LabeledSet":
        return LabeledSet(self.shards[idx], self.keys[idx], self.labels[idx], self.embeddings[idx],
                          None if self.pixels is None else self.pixels[idx], Counter(self.excluded),
                          dict(self.shard_failures))

    @classmethod
    def concat(cls, parts: list["LabeledSet"], dim: int, pixel_size: Optional[int]) -> "LabeledSet":
        """Parts in shard order, so the set (and every selection from it) is the same on a re-run."""
        parts = sorted(parts, key=lambda p: (p.shards[0] if len(p) else "", len(p)))
        excluded, failures = Counter(), {}
        for p in parts:
            excluded.update(p.excluded)
            failures.update(p.shard_failures)
        nonempty = [p for p in parts if len(p)]
        if not nonempty:
            empty_pixels = None if pixel_size is None else np.zeros((0, pixel_size, pixel_size, 3), np.uint8)
            return cls(np.zeros(0, object), np.zeros(0, object), np.zeros(0, np.int64),
                       np.zeros((0, dim), np.float32), empty_pixels, excluded, failures)
        return cls(
            np.concatenate([p.shards for p in nonempty]), np.concatenate([p.keys for p in nonempty]),
            np.concatenate([p.labels for p in nonempty]), np.concatenate([p.embeddings for p in nonempty]),
            None if pixel_size is None else np.concatenate([p.pixels for p in nonempty]), excluded, failures,
        )


def join_labels(
    shard: str,
    keys,
    statuses,
    ok_embeddings: np.ndarray,
    samples: list[TarSample],
    label_field: str,
    image_extensions,
    pixel_spec: Optional[PreprocessSpec] = None,
    draft: bool = True,
    max_pixels: int = 89_478_485,
) -> LabeledSet:
    """One shard's embeddings (all rows, `ok_embeddings` for the ok ones) + its tar's samples.

    A sample is used when its embedding is ok and finite, its `.json` member holds an integer
    label and (with `pixel_spec`) its image decodes; every other one is counted by reason.
    """
    statuses = np.asarray(statuses, dtype=object)
    ok_rows = np.nonzero(statuses == schema.STATUS_OK)[0]
    excluded = Counter(str(s) for s in statuses[statuses != schema.STATUS_OK])
    by_key = {s.key: s for s in samples if s.status == schema.STATUS_OK}
    use_keys, use_labels, use_rows, use_pixels = [], [], [], []
    for vec_index, row in enumerate(ok_rows):
        key = str(keys[row])
        sample = by_key.get(key)
        if sample is None:
            excluded[EXCLUDED_NOT_IN_TAR] += 1
            continue
        if not np.isfinite(ok_embeddings[vec_index]).all():
            excluded[schema.STATUS_BAD_EMBEDDING] += 1
            continue
        found = sample.member((LABEL_MEMBER,))
        label, why = parse_label(found[1] if found else None, label_field)
        if why:
            excluded[why] += 1
            continue
        if pixel_spec is not None:
            image = sample.member(image_extensions)
            arr, status = decode_image(image[1] if image else b"", pixel_spec, draft, max_pixels)
            if arr is None:
                excluded[status] += 1
                continue
            use_pixels.append(arr)
        use_keys.append(key)
        use_labels.append(label)
        use_rows.append(vec_index)
    dim = ok_embeddings.shape[1]
    pixels = None
    if pixel_spec is not None:
        size = pixel_spec.size
        pixels = np.stack(use_pixels) if use_pixels else np.zeros((0, size, size, 3), np.uint8)
    return LabeledSet(
        np.full(len(use_keys), shard, dtype=object), np.array(use_keys, dtype=object),
        np.array(use_labels, dtype=np.int64),
        l2_normalize(ok_embeddings[use_rows]) if use_rows else np.zeros((0, dim), np.float32),
        pixels, excluded,
    )


# --- pool and prototypes -----------------------------------------------------------------------


def class_indices(*label_arrays: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Labels as they are (any integers >= 0) -> (the distinct labels, each array as indices 0..C-1),
    so the classifiers' heads have one output per label that occurs, however labels are numbered."""
    classes = np.unique(np.concatenate(label_arrays))
    return classes, [np.searchsorted(classes, a).astype(np.int64) for a in label_arrays]


def label_counts(labels: np.ndarray) -> dict[str, int]:
    values, counts = np.unique(labels, return_counts=True)
    return {str(v): int(c) for v, c in zip(values, counts)}


def draw_pool(n_available: int, pool_size: Optional[int], seed: int) -> np.ndarray:
    """Sorted indices of the pool: everything, or a seeded random subset of `pool_size`."""
    if pool_size is None or pool_size >= n_available:
        if pool_size is not None and pool_size > n_available:
            raise ValueError(f"evaluate.pool_size={pool_size} but only {n_available} labeled train samples are usable")
        return np.arange(n_available)
    return np.sort(np.random.default_rng(seed).choice(n_available, size=pool_size, replace=False))


def prototypes(embeddings: np.ndarray, cfg: KMeansConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """Spherical k-means on the pool (a seeded sample of `sample_size` when larger), then the
    Lloyd refinement over the whole pool when `refine_iters` asks for it (the pool is one block),
    as the prototype stage does; -> (cluster int32, distance float32 = 1 - cosine, metadata)."""
    n = len(embeddings)
    fit_rows = np.arange(n)
    if n > cfg.sample_size:
        fit_rows = np.sort(np.random.default_rng(cfg.seed).choice(n, size=cfg.sample_size, replace=False))
    k = cfg.k or default_k(n)
    centroids, meta = fit_spherical_kmeans(embeddings[fit_rows], k, cfg.niter, cfg.nredo, cfg.seed, init=cfg.init)
    if cfg.refine_iters:
        centroids, meta["refine"] = lloyd.refine(
            centroids, lambda c: [lloyd.block_stats(embeddings, c)], cfg.refine_iters, cfg.refine_tol
        )
    cluster, cosine = assign(embeddings, centroids)
    meta |= {"k_default_used": cfg.k is None, "cluster_sizes": np.bincount(cluster, minlength=meta["k"]).tolist()}
    return cluster, prototype_distance(cosine), meta


# --- selection: the select stage's passes, over the pool held in memory -------------------------


def split_policy(policy: str) -> tuple[str, bool]:
    """'balanced-hard' -> ('hard', True): the select stage's policy and `balanced` flag."""
    balanced = policy.startswith(BALANCED_PREFIX)
    return (policy[len(BALANCED_PREFIX):] if balanced else policy), balanced


def pool_priorities(policy: str, distance: np.ndarray, shards: np.ndarray, keys: np.ndarray, seed: int) -> np.ndarray:
    """`selection.priorities` per input shard, as the select stage computes them shard by shard."""
    prio = np.zeros(len(keys), np.uint64)
    names, shard_of = np.unique(shards, return_inverse=True)
    for i, shard in enumerate(names):
        rows = np.nonzero(shard_of == i)[0]
        prio[rows] = selection.priorities(policy, distance[rows].astype(np.float64), str(shard),
                                          [str(k) for k in keys[rows]], seed)
    return prio


def select_bands(
    policy: str, keep_fractions, distance, cluster, n_clusters: int, shards, keys, seed: int
) -> np.ndarray:
    """Band of every pool sample: index of the smallest keep fraction that keeps it (-1: none).

    The select stage's sequence (priorities -> histogram -> plan_cuts -> boundary_values ->
    finalize_cuts -> Cuts.apply) with the keep fractions as the band edges: each edge's cut is
    exact and independent, so `band <= i` is the selection `ssl-prune run` makes at fraction i.
    """
    base, balanced = split_policy(policy)
    prio = pool_priorities(base, np.asarray(distance), np.asarray(shards), np.asarray(keys), seed)
    groups = np.asarray(cluster, np.int64) if balanced else np.zeros(len(prio), np.int64)
    spec = selection.HistogramSpec.for_groups(n_clusters if balanced else 1)
    edges = sorted(float(f) for f in keep_fractions)
    hist = selection.histogram(prio, groups, spec)
    plan = selection.plan_cuts(hist, spec, edges)
    merged = selection.merge_boundary_values([selection.boundary_values(prio, groups, plan)])
    cuts = selection.finalize_cuts(plan, merged)
    _keep, band, _pct = cuts.apply(prio, groups, hist)
    return band


def kept_indices(bands: np.ndarray, fraction_index: int) -> np.ndarray:
    return np.nonzero((bands >= 0) & (bands <= fraction_index))[0]


# --- run planning ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    classifier: str
    policy: str
    keep_fraction: float
    seed: int

    @property
    def tag(self) -> str:
        return f"{self.policy}@{fraction_label(self.keep_fraction)}"


@dataclass
class RunGroup:
    """Rows that train the same classifier on the same subset with the same seed: one training."""

    specs: list[RunSpec]
    train_idx: np.ndarray  # pool indices of the kept subset

    @property
    def lead(self) -> RunSpec:
        return self.specs[0]


def plan_runs(classifiers, policies, keep_fractions, seeds, bands: dict[tuple[str, int], np.ndarray]) -> list[RunGroup]:
    """Every (classifier, policy, fraction, seed), grouped by identical training subsets.

    `bands[(policy, seed)]` is that selection's `select_bands`. Keep fraction 1.0 is the whole
    pool under every policy, so it is trained once per (classifier, seed) and shared; the linear
    probe, which the seed does not change, is trained once per subset whatever the seed.
    """
    fractions = sorted(keep_fractions)
    groups: dict[tuple, RunGroup] = {}
    for clf in classifiers:
        for seed in seeds:
            for policy in policies:
                for i, f in enumerate(fractions):
                    idx = kept_indices(bands[(policy, seed)], i)
                    digest = hashlib.sha256(idx.astype(np.int64).tobytes()).hexdigest()
                    spec = RunSpec(clf, policy, float(f), int(seed))
                    key = (clf, digest) if clf in SEED_FREE else (clf, seed, digest)
                    group = groups.setdefault(key, RunGroup([], idx))
                    group.specs.append(spec)
    return list(groups.values())


# --- classifiers -------------------------------------------------------------------------------


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


def _accuracy(model, batch_inputs, labels: np.ndarray, batch_size: int = 1024) -> float:
    import torch

    if len(labels) == 0:
        return float("nan")
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            idx = np.arange(start, min(start + batch_size, len(labels)))
            pred = model(batch_inputs(idx, None)).argmax(dim=1).numpy()
            correct += int((pred == labels[idx]).sum())
    return correct / len(labels)


def standardize(train_pool: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Unit-norm features, centred and scaled by the pool's statistics (the same for every subset)."""
    pool = l2_normalize(train_pool)
    mean, std = pool.mean(axis=0), pool.std(axis=0) + 1e-6
    return [((x - mean) / std).astype(np.float32) for x in (pool, *(l2_normalize(o) for o in others))]


def _nothing_kept(test_y) -> dict:
    """A selection that keeps no sample (e.g. a tiny fraction of tiny clusters): no classifier, no score."""
    return {ACCURACY: float("nan"), STEPS: 0, TRAIN_SECONDS: 0.0, N_TRAIN: 0, N_TEST: len(test_y)}


def train_linear_probe(train_x, train_y, test_x, test_y, n_classes: int, cfg: LinearProbeConfig, seed: int) -> dict:
    """The linear probe (prune/probes.py) on the kept subset only; features standardized by the pool.

    Solved to convergence from zero weights: deterministic, so `seed` changes nothing here.
    """
    from .probes import linear_probe

    if len(train_y) == 0:
        return _nothing_kept(test_y)
    t0 = time.perf_counter()
    pred = linear_probe(train_x, train_y, test_x, cfg.weight_decay, cfg.max_iter, n_classes, standardize=False)
    return {ACCURACY: float(np.mean(pred == np.asarray(test_y))), STEPS: cfg.max_iter,
            TRAIN_SECONDS: round(time.perf_counter() - t0, 3), N_TRAIN: len(train_y), N_TEST: len(test_y)}


def small_cnn(n_classes: int, width: int, in_channels: int = 3):
    """conv(w/2) pool conv(w) pool conv(2w) global-avg-pool linear, each conv + BN + ReLU.

    The full-resolution layer is the narrow one: ~2.1M multiply-adds per 28x28 image at width
    32, about 10-16 s per 60k-image epoch on one core (channels-last).
    """
    import torch.nn as nn

    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    stem = max(1, width // 2)
    return nn.Sequential(
        *block(in_channels, stem), nn.MaxPool2d(2),
        *block(stem, width), nn.MaxPool2d(2),
        *block(width, 2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, n_classes),
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
    """The small CNN on pixels, `cfg.epochs` passes over the kept subset, at least `cfg.min_steps` steps."""
    import torch

    if len(train_y) == 0:
        return _nothing_kept(test_y)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = small_cnn(n_classes, cfg.width, train_pixels.shape[-1]).to(memory_format=torch.channels_last)
    steps = train_steps(len(train_y), cfg.batch_size, cfg.epochs, cfg.min_steps)

    def inputs(pixels):
        def batch(idx, gen):
            raw = pixels[idx]
            return pixels_to_tensor(shift_and_flip(raw, gen) if gen is not None and cfg.augment else raw)
        return batch

    _fit(model, inputs(train_pixels), train_y, steps, cfg.batch_size, cfg.lr, 0.0, seed)
    fit_s = time.perf_counter() - t0
    return {ACCURACY: _accuracy(model, inputs(test_pixels), np.asarray(test_y), batch_size=512), STEPS: steps,
            TRAIN_SECONDS: round(fit_s, 3), N_TRAIN: len(train_y), N_TEST: len(test_y)}


# --- results: csv, aggregate table, markdown, plot ---------------------------------------------


def results_csv(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in RESULT_COLUMNS})
    return buf.getvalue().encode()


def read_results_csv(data: bytes) -> list[dict]:
    """Rows of a results.csv, typed; a row that does not parse is dropped (it is simply re-run)."""
    rows = []
    for raw in csv.DictReader(io.StringIO(data.decode())):
        try:
            row = dict(raw)
            for c in _INT_COLUMNS:
                row[c] = int(row[c])
            for c in _FLOAT_COLUMNS:
                row[c] = float(row[c])
            rows.append(row)
        except (KeyError, TypeError, ValueError):
            continue
    return rows


def sort_rows(rows: list[dict], classifiers, policies) -> list[dict]:
    order = {c: i for i, c in enumerate(classifiers)} | {p: i for i, p in enumerate(policies)}
    return sorted(rows, key=lambda r: (order.get(r[CLASSIFIER], 99), order.get(r[POLICY], 99),
                                       r[KEEP_FRACTION], r[SEED]))


def aggregate(rows: list[dict]) -> dict:
    """(classifier, policy, keep fraction) -> mean and sample std (ddof=1) of accuracy over seeds."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r[CLASSIFIER], r[POLICY], float(r[KEEP_FRACTION])), []).append(r)
    out = {}
    for key, rs in cells.items():
        acc = np.array([r[ACCURACY] for r in rs], dtype=np.float64)
        out[key] = {
            "mean": float(acc.mean()),
            "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "seeds": len(acc),
            N_TRAIN: sorted({int(r[N_TRAIN]) for r in rs}),
        }
    return out


def best_policies(agg: dict, classifier: str, policies, fractions) -> dict:
    """keep fraction -> the policy with the highest mean accuracy, or "tie" (e.g. at 1.0, where
    every policy keeps the whole pool): the paper's rule is read off this."""
    best = {}
    for f in fractions:
        scored = sorted(((agg[(classifier, p, f)]["mean"], p) for p in policies
                         if (classifier, p, f) in agg and not math.isnan(agg[(classifier, p, f)]["mean"])), reverse=True)
        if scored:
            best[f] = "tie" if len(scored) > 1 and scored[0][0] == scored[1][0] else scored[0][1]
    return best


def markdown_table(rows: list[dict], classifiers, policies, fractions, header: dict) -> str:
    """Per classifier: rows = policy, columns = keep fraction, cells = accuracy % mean ± std over seeds."""
    agg = aggregate(rows)
    shared = sum(1 for r in rows if r[SHARED_FROM])
    lines = [
        f"# Accuracy vs keep fraction: pool {header['pool']} ({header['n_pool']} samples)",
        "",
        f"Encoder `{header['model_id']}`{' (random init)' if header.get('random_init') else ''}, "
        f"k = {header['k']} prototypes; test set {header['n_test']} samples; seeds {', '.join(map(str, header['seeds']))}. "
        "Cells: test accuracy (%), mean ± std over seeds (sample std; the mean alone for one seed). "
        "The classifier sees the kept subset only.",
        "",
        f"{len(rows)} runs; {shared} of them share the training of an identical run (same subset and seed: "
        "keep fraction 1.0 keeps the whole pool under every policy), named in `shared_from` of results.csv.",
    ]
    for clf in classifiers:
        lines += ["", f"## {clf}", "", "| policy | " + " | ".join(fraction_label(f) for f in fractions) + " |",
                  "| --- |" + " ---: |" * len(fractions)]
        for p in policies:
            cells = []
            for f in fractions:
                a = agg.get((clf, p, f))
                if a is None or math.isnan(a["mean"]):
                    cells.append("–")
                else:  # one seed has no spread to show
                    spread = f" ± {100 * a['std']:.1f}" if a["seeds"] > 1 else ""
                    cells.append(f"{100 * a['mean']:.1f}{spread}")
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
        n_cells = []
        for f in fractions:
            counts = sorted({n for p in policies for n in agg.get((clf, p, f), {}).get(N_TRAIN, [])})
            n_cells.append(" / ".join(map(str, counts)) or "–")
        lines.append("| n_train | " + " | ".join(n_cells) + " |")
        best = best_policies(agg, clf, policies, fractions)
        if best:
            lines += ["", "Best policy per keep fraction: " + ", ".join(f"{fraction_label(f)} {p}" for f, p in best.items()) + "."]
    return "\n".join(lines) + "\n"


def accuracy_plot(rows: list[dict], classifiers, policies, fractions, title: str) -> bytes:
    """PNG: one subplot per classifier, accuracy vs keep fraction, one line per policy with error bars."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg canvas

    agg = aggregate(rows)
    fig = Figure(figsize=(5.5 * len(classifiers), 4.3), layout="constrained")
    axes = fig.subplots(1, len(classifiers), squeeze=False)[0]
    for ax, clf in zip(axes, classifiers):
        for p in policies:
            pts = [(f, agg[(clf, p, f)]) for f in fractions if (clf, p, f) in agg]
            if not pts:
                continue
            ax.errorbar([f for f, _ in pts], [100 * a["mean"] for _, a in pts], yerr=[100 * a["std"] for _, a in pts],
                        marker="o", markersize=4, capsize=3, label=p)
        ax.set_title(clf)
        ax.set_xlabel("keep fraction")
        ax.set_ylabel("test accuracy (%)")
        ax.set_xticks(list(fractions))
        ax.set_xticklabels([fraction_label(f) for f in fractions])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()
