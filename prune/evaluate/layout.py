"""`evaluate`'s output layout, results.csv columns and the reasons a sample is left out."""

from __future__ import annotations

from typing import Optional

from prune import schema

# --- output layout: <output>/{train,test}/embeddings/ and <output>/pool-<all|N>/ ----------------
TRAIN_DIR = "train"  # the embed stage's output for the pool's shards
TEST_DIR = "test"  # ... and for the test shards
RESULTS_CSV = "results.csv"  # one row per (classifier, policy, keep fraction, seed)
SUBSETS_DIR = "subsets"  # clip: each trained subset's shards (<digest>/NNNNN.tar, sizes.json) and its training
RESULTS_MD = "results.md"  # per classifier: policy x keep fraction, mean ± std over seeds
PLOT_PNG = "accuracy.png"  # accuracy vs keep fraction, one line per policy
SUMMARY_JSON = "summary.json"  # settings, counts, prototypes, timings

# --- results.csv columns, in file order ------------------------------------------------------
POOL, N_POOL, CLASSIFIER, POLICY, KEEP_FRACTION, SEED = "pool", "n_pool", "classifier", "policy", "keep_fraction", "seed"
N_TRAIN, N_TEST, ACCURACY, STEPS, TRAIN_SECONDS = "n_train", "n_test", "accuracy", "steps", "train_seconds"
BALANCED_ACCURACY = "balanced_accuracy"  # mean of the per-class accuracies
WORST3_ACCURACY = "worst3_accuracy"  # mean accuracy of the 3 worst classes
RECALL_1 = "recall@1"  # clip: image-text retrieval on held-out pairs, the mean of both directions
RECALL_5 = "recall@5"
COPIES_KEPT = "copies_kept"  # share of the pool's near-copies (kind "copy") the subset keeps
JUNK_KEPT = "junk_kept"  # share of the pool's junk the subset keeps
MISCAPTIONED_KEPT = "miscaptioned_kept"  # share of the pool's captions that do not describe their image, kept
CLUSTERS_COVERED = "clusters_covered"  # clusters with at least one kept sample
SHARED_FROM = "shared_from"  # "<policy>@<keep fraction>" whose training (same subset, same seed) this row reuses
FINGERPRINT = "fingerprint"  # settings that made the row: a re-run reuses rows whose fingerprint matches
RESULT_COLUMNS = (POOL, N_POOL, CLASSIFIER, POLICY, KEEP_FRACTION, SEED, N_TRAIN, N_TEST, ACCURACY,
                  BALANCED_ACCURACY, WORST3_ACCURACY, RECALL_1, RECALL_5, COPIES_KEPT, JUNK_KEPT, MISCAPTIONED_KEPT, CLUSTERS_COVERED, STEPS,
                  TRAIN_SECONDS, SHARED_FROM, FINGERPRINT)
_INT_COLUMNS = (N_POOL, SEED, N_TRAIN, N_TEST, STEPS)
_FLOAT_COLUMNS = (KEEP_FRACTION, ACCURACY, TRAIN_SECONDS)
# columns added later: a row written before them reads them as NaN
_OPTIONAL_FLOAT_COLUMNS = (BALANCED_ACCURACY, WORST3_ACCURACY, RECALL_1, RECALL_5, COPIES_KEPT, JUNK_KEPT,
                           MISCAPTIONED_KEPT, CLUSTERS_COVERED)

# the kind of a pool sample (web-like pools, prune/demo/web_like.py; other pools: all originals)
KIND_FIELD = "kind"
KIND_ORIGINAL, KIND_COPY, KIND_JUNK = "original", "copy", "junk"
CAPTION_KIND_FIELD = "caption_kind"  # web-like captions: describes, wrong, noise, empty, spam (prune/demo/captions.py)
CAPTION_DESCRIBES = "describes"
JUNK_LABEL = -1  # junk has no class: kept junk costs budget and teaches nothing
DEDUP_PREFIX = "dedup+"  # a policy applied after SemDeDup of the pool (evaluate.dedup), e.g. dedup+capped-hard
CAPTION = "caption"  # caption agreement alone: the best-agreeing pairs (clip_score, top fraction)
CAPTION_PREFIX = "caption+"  # caption agreement first (evaluate.caption_share of the pool), then the policy
CAPTION_SUFFIX = "+caption"  # the policy first, then caption agreement keeps caption_share of its pick
# the image-text ceiling: the oracle among the pairs whose caption describes the image (the json's caption_kind)
CAPTION_ORACLE = "caption-oracle"
ORACLE = "oracle"  # the ceiling: originals only, classes capped evenly (uses labels no policy may see)

# --- why a sample is left out (besides its embedding status, e.g. undecodable_image) ---------
EXCLUDED_NO_JSON = "no_json_member"
EXCLUDED_BAD_JSON = "unparseable_json"
EXCLUDED_NO_LABEL = "missing_label"
EXCLUDED_BAD_LABEL = "non_integer_label"  # not an integer >= 0 (a float 3.0 or the string "3" pass)
EXCLUDED_NOT_IN_TAR = "not_in_tar"  # embedded, but the tar no longer holds it (changed since)

LINEAR, CNN, CLIP = "linear", "cnn", "clip"  # clip: the pretraining judge (open_clip_train on the subset's shards)
SEED_FREE = (LINEAR,)  # solved to convergence from zero weights: one training serves every seed
BALANCED_PREFIX = schema.BALANCED_PREFIX
LABEL_MEMBER = "json"


def fraction_label(f: float) -> str:
    """0.1 -> "0.1", 1 -> "1.0": how a keep fraction is written in tables, tags and the plot."""
    text = f"{float(f):g}"
    return text if "." in text or "e" in text else text + ".0"


def pool_label(pool_size: Optional[int]) -> str:
    return "all" if pool_size is None else str(pool_size)


def pool_dir(pool_size: Optional[int]) -> str:
    return f"pool-{pool_label(pool_size)}"
