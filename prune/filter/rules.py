"""Which samples the basic filter removes, and why: a pure function of one shard's metadata table."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from prune import schema
from prune.filter.settings import FilterConfig

# img2dataset's columns: the source image's size when the sample was resized, else its own
SIZE_COLUMNS = (("original_width", "original_height"), ("width", "height"))
CAPTION = "caption"


def _sides(metadata: pa.Table) -> tuple[np.ndarray, np.ndarray] | None:
    for w, h in SIZE_COLUMNS:
        if w in metadata.column_names and h in metadata.column_names:
            as_float = lambda c: pc.cast(metadata.column(c), pa.float64()).to_numpy(zero_copy_only=False)  # noqa: E731
            return as_float(w), as_float(h)
    return None


def removal_reasons(metadata: pa.Table, rules: FilterConfig) -> np.ndarray:
    """Per metadata row, the first rule it fails (its removal status), or None. A rule whose column
    the metadata lacks, or a row whose value is null, removes nothing: the filter never guesses."""
    n = len(metadata)
    reason = np.full(n, None, dtype=object)

    def mark(failed: np.ndarray, status: str) -> None:
        reason[(reason == None) & failed] = status  # noqa: E711 (elementwise)

    sides = _sides(metadata)
    if sides is not None:
        w, h = sides
        with np.errstate(invalid="ignore", divide="ignore"):
            # np.minimum/maximum keep a null (NaN) side: a comparison with NaN removes nothing
            if rules.min_image_side:
                mark(np.minimum(w, h) < rules.min_image_side, schema.STATUS_SMALL_IMAGE)
            if rules.max_aspect_ratio is not None:
                mark(np.maximum(w, h) / np.minimum(w, h) > rules.max_aspect_ratio, schema.STATUS_ASPECT_RATIO)
    if CAPTION in metadata.column_names:
        caption = pc.fill_null(pc.cast(metadata.column(CAPTION), pa.string()), None)
        known = caption.is_valid().to_numpy(zero_copy_only=False)
        if rules.min_caption_words:
            words = pc.list_value_length(pc.utf8_split_whitespace(caption)).to_numpy(zero_copy_only=False)
            mark(known & (np.nan_to_num(words, nan=0) < rules.min_caption_words), schema.STATUS_SHORT_CAPTION)
        if rules.caption_blocklist:
            found = pc.match_substring_regex(caption, rules.caption_blocklist, ignore_case=True)
            mark(pc.fill_null(found, False).to_numpy(zero_copy_only=False), schema.STATUS_BLOCKED_CAPTION)
    return reason
