"""The data contract: every column name, status string and output path, defined once.

Every module that reads or writes a file imports its names from here, so the layout
documented in docs/concepts.md and the layout on disk cannot drift apart.
"""

from __future__ import annotations

import pyarrow as pa

# --- sample identity and status -------------------------------------------------------
KEY = "key"  # img2dataset sample key, e.g. "000010005"
SHARD = "shard"  # input shard id: the tar's file name without ".tar", e.g. "00001"
STATUS = "status"  # "ok" or the reason the sample failed

STATUS_OK = "ok"
# Failure reasons a sample may carry. Anything else in the status column is a bug.
STATUS_NO_IMAGE = "no_image_member"
STATUS_EMPTY = "empty_image"
STATUS_UNDECODABLE = "undecodable_image"
STATUS_BOMB = "decompression_bomb"
STATUS_TRUNCATED = "truncated_tar"
STATUS_UNSAFE_NAME = "unsafe_member_name"
STATUS_DUPLICATE_KEY = "duplicate_key"
STATUS_BAD_NAME = "non_utf8_member_name"
STATUS_BAD_EMBEDDING = "invalid_embedding"  # NaN/inf from the model: no nearest prototype
STATUS_NO_IMPORTED = "no_imported_embedding"  # import joined to tar shards: no embedding has the key
FAILURE_STATUSES = (
    STATUS_NO_IMAGE,
    STATUS_EMPTY,
    STATUS_UNDECODABLE,
    STATUS_BOMB,
    STATUS_TRUNCATED,
    STATUS_UNSAFE_NAME,
    STATUS_DUPLICATE_KEY,
    STATUS_BAD_NAME,
    STATUS_BAD_EMBEDDING,
    STATUS_NO_IMPORTED,
)

# Samples a curation stage removed (not failures: they were read and embedded fine), each with
# its stage's reason. Selection skips them; the manifest counts them apart: input = kept + pruned +
# removed + failed. A status that is neither ok nor a failure is a removal (`is_removal`), so a new
# curation stage brings its own reasons without a list here to extend.
STATUS_NEAR_DUPLICATE = "near_duplicate"  # SemDeDup: too close to a member kept in its cluster
STATUS_SMALL_IMAGE = "small_image"  # filter: the image's shorter side is below filter.min_image_side
STATUS_ASPECT_RATIO = "extreme_aspect_ratio"  # filter: longer / shorter side above filter.max_aspect_ratio
STATUS_SHORT_CAPTION = "short_caption"  # filter: fewer words than filter.min_caption_words
STATUS_BLOCKED_CAPTION = "blocked_caption"  # filter: the caption matches filter.caption_blocklist
STATUS_LOW_ALIGNMENT = "low_alignment"  # clip_score: caption and image agree less than the rule keeps
STATUS_NO_CAPTION = "no_caption"  # clip_score with clip_score.missing=remove: the sample has no caption
REMOVAL_STATUSES = (STATUS_NEAR_DUPLICATE, STATUS_SMALL_IMAGE, STATUS_ASPECT_RATIO, STATUS_SHORT_CAPTION,
                    STATUS_BLOCKED_CAPTION, STATUS_LOW_ALIGNMENT, STATUS_NO_CAPTION)


def is_removal(status):
    """Which statuses are a curation stage's removal: a reason that is neither ok nor a failure
    (numpy, vectorized; a null is none)."""
    import numpy as np

    status = np.asarray(status, dtype=object)
    return ~np.isin(status, (STATUS_OK, "", None, *FAILURE_STATUSES))


# Shard-level failures (the shard yields no samples at all); recorded in the manifest.
SHARD_NOT_A_TAR = "not_a_tar"
SHARD_UNREADABLE = "unreadable"  # I/O kept failing after retries
SHARD_EMPTY = "empty_shard"  # a valid tar with no sample in it

# --- columns --------------------------------------------------------------------------
EMBEDDING = "embedding"  # fixed-size list<float16>, L2-normalized; null when status != ok
CLUSTER = "cluster"  # index of the nearest prototype; -1 when status != ok
DISTANCE = "distance"  # 1 - cosine similarity to the nearest prototype; null when status != ok
PRIORITY = "priority"  # uint64 sort key of the selection policy: larger is kept first
PERCENTILE = "percentile"  # share of the selection group (all, or the cluster) ranked above: 0 = kept first
KEEP = "keep"
BAND = "band"  # index of the distance band the kept sample is written in; -1 if not kept

# --- columns of rows in flight (Ray Data, between read, decode and embed; never written) ---
IMAGE = "image"  # the image member's bytes, as read from the tar
CAPTION_MEMBER = "txt"  # a sample's caption member in a tar (img2dataset's key.txt)
CAPTION = "caption"  # the sample's caption (its .txt member, else the parquet's caption column); null if none
PIXELS = "pixels"  # the decoded uint8 crop [size, size, 3] the model's preprocessing asks for

# --- selection policies shipped with the package (prune/select/policies.py registers them) ---
POLICY_HARD = "hard"  # far from the prototype first (the paper's choice when data is abundant)
POLICY_EASY = "easy"  # near the prototype first (scarce data)
POLICY_RANDOM = "random"  # a seeded hash: the baseline every policy must beat
POLICY_STRATIFIED = "stratified"  # CCS: even coverage of the distance range, the hardest share dropped
BALANCED_PREFIX = "balanced-"  # `evaluate`'s name for a policy applied within each cluster
# `evaluate`'s names for a policy within each cluster under a budget (prune/select/budgets.py)
BUDGET_PREFIXES = {BALANCED_PREFIX: "proportional", "capped-": "capped_equal", "dbp-": "dbp"}

# --- parquet schema metadata: what made a per-shard file, so a re-run knows it is done ---
META_EMBED_FINGERPRINT = b"ssl_prune_fingerprint"  # embeddings: settings that made them
META_MODEL_ID = b"model_id"  # embeddings
META_SOURCE_URL = b"source_url"  # embeddings: the input tar they came from
META_SHARD_ERROR = b"shard_error"  # embeddings and scores: why the shard yielded no sample
META_ASSIGN_FINGERPRINT = b"assign_fingerprint"  # assign/ (and the scores made from it): their prototypes
META_SELECT_FINGERPRINT = b"select_fingerprint"  # scores: selection their keep/band come from
META_EXPORT_FINGERPRINT = b"export_fingerprint"  # export/: the selection and settings it lists
META_REMOVALS_FINGERPRINT = b"removals_fingerprint"  # removals/<stage>/: the curation that removed these samples
META_STAGE_FINGERPRINT = b"stage_fingerprint"  # any other shard stage's per-shard file (pipelines/shard_stage.py)
# scores written by versions before each stage owned its outputs, whose statuses a dedup rewrote
# (even after select): never the current selection's own, whatever their select stamp says
META_LEGACY_CURATED_BY = b"curated_by"

# --- output layout --------------------------------------------------------------------
EMBEDDINGS_DIR = "embeddings"
PROTOTYPES_DIR = "prototypes"
ASSIGN_DIR = "assign"  # per input shard: each sample's nearest prototype and distance (the assign stage's)
# per curation stage and input shard, removals/<stage>/NNNNN.parquet: the samples it removed, each
# with its reason (the status) and the stage's own columns; written by that stage alone
REMOVALS_DIR = "removals"
DRIFT_DIR = "drift"  # extend: drift.json, the new samples' distances against the parent's (prune/cluster/drift.py)
SELECTION_DIR = "selection"  # the select stage's thresholds, for an extension's new samples (prune/select/record.py)
SCORES_DIR = "scores"  # per input shard: the selection's, made from assign/ and every removal before it
PRUNED_DIR = "pruned"
IMPORTED_DIR = "imported"  # import stage: per part, the carried metadata columns (url, caption, uid)
EXPORT_DIR = "export"  # the kept set's ids: DataComp's subset file, and ...
EXPORT_IDS_DIR = "export/ids"  # ... per input shard, a Parquet of the kept samples' ids
STAGING_DIR = "_staging"  # per-run scratch, removed when a stage completes
# per input shard: where its samples lie in the tar (prune/io/tar_index_cache.py), recorded by the
# embed stage's reads of the whole tar; the write stage uses it instead of walking the tar again
TAR_INDEX_DIR = "tar_index"
MANIFEST = "manifest.json"
STAGE_MARKER = "_stage.json"  # per stage directory: the fingerprint its files were made with
PENDING_MARKER = "_pending.json"  # pruned/: a write of this fingerprint has started (resumable)
CENTROIDS_FILE = "centroids.npy"
KMEANS_META_FILE = "kmeans.json"
SIZES_FILE = "sizes.json"  # open_clip's trainer: {shard file name: sample count}
BANDS_FILE = "bands.json"  # which pruned shards make up each smaller keep fraction
STATS_SUFFIX = "_stats.json"

IMAGE_EXTENSIONS_DEFAULT = ("jpg", "jpeg", "png", "webp")


def shard_file(shard: str, ext: str = "parquet") -> str:
    """A per-shard output's file name: embeddings/, scores/ and the pruned parquet use `NNNNN.parquet`."""
    return f"{shard}.{ext}"


def pruned_shard_name(index: int) -> str:
    """The n-th pruned shard's file name: img2dataset's 5-digit numbering, e.g. "00003.tar"."""
    return f"{index:05d}.tar"


def shard_id_of(path: str) -> str:
    """The shard id of an input tar path: its base name without the .tar suffix."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name[: -len(".tar")] if name.endswith(".tar") else name


# embeddings/ with embed.text (a backend with a text tower): per sample beside the image embedding
TEXT_EMBEDDING = "text_embedding"  # the caption's, fixed-size list<float16>, L2-normalized; null: no caption
CLIP_SCORE = "clip_score"  # cosine of the image and caption embeddings (float32); null: no caption or not ok


def embeddings_schema(dim: int, text_dim: int | None = None) -> pa.Schema:
    """embeddings/NNNNN.parquet; with `text_dim`, the caption's embedding and the clip score too."""
    fields = [(KEY, pa.string()), (SHARD, pa.string()), (STATUS, pa.string()), (EMBEDDING, pa.list_(pa.float16(), dim))]
    if text_dim is not None:
        fields += [(TEXT_EMBEDDING, pa.list_(pa.float16(), text_dim)), (CLIP_SCORE, pa.float32())]
    return pa.schema(fields)


SCORES_SCHEMA = pa.schema(
    [
        (KEY, pa.string()),
        (SHARD, pa.string()),
        (STATUS, pa.string()),
        (CLUSTER, pa.int32()),
        (DISTANCE, pa.float32()),
        (PRIORITY, pa.uint64()),
        (PERCENTILE, pa.float64()),
        (KEEP, pa.bool_()),
        (BAND, pa.int32()),
    ]
)

# assign/NNNNN.parquet: the assignment, one row per input sample, in the embeddings' order
ASSIGN_SCHEMA = pa.schema(SCORES_SCHEMA.field(name) for name in (KEY, SHARD, STATUS, CLUSTER, DISTANCE))
SELECTION_COLUMNS = (PRIORITY, PERCENTILE, KEEP, BAND)  # what select adds to the assignment in scores/

# removals/<stage>/NNNNN.parquet: one row per removed sample, these columns first, then the stage's own
REMOVAL_SCHEMA = pa.schema([(KEY, pa.string()), (STATUS, pa.string())])


def removals_dir(stage: str) -> str:
    """A curation stage's own directory of removals."""
    return f"{REMOVALS_DIR}/{stage}"


# removals/dedup/NNNNN.parquet: one row per removed sample (KEY, STATUS, CLUSTER as above)
DUPLICATE_OF = "duplicate_of"  # the key of the member it is a near-copy of ...
DUPLICATE_OF_SHARD = "duplicate_of_shard"  # ... and that member's input shard
SIMILARITY = "similarity"  # their cosine similarity
# ... and the output directory of the run that kept that member, when it is an earlier run an
# extension looked back at (null: this run's own sample)
DUPLICATE_OF_OUTPUT = "duplicate_of_output"
DEDUP_SCHEMA = pa.schema(
    [
        *REMOVAL_SCHEMA,
        (CLUSTER, pa.int32()),
        (DUPLICATE_OF_SHARD, pa.string()),
        (DUPLICATE_OF, pa.string()),
        (SIMILARITY, pa.float32()),
        (DUPLICATE_OF_OUTPUT, pa.string()),
    ]
)
FIXED = "fixed"  # dedup's staging: a member an earlier run kept (compared with, never removed)
RUN_OUTPUT = "run_output"  # dedup's staging: that earlier run's output directory ("" for this run)

# Columns the pruned shards' parquet adds to the img2dataset metadata.
SCORE_COLUMNS_IN_PRUNED = (CLUSTER, DISTANCE, PERCENTILE, BAND)
# The column the pruned parquet keeps the source shard in (img2dataset's own "shard" is absent).
SOURCE_SHARD = "source_shard"
