"""Settings of caption-image agreement: the `clip_score` section of a config."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from prune.settings import Section


class ClipScoreConfig(Section):
    """Which pairs the clip_score stage removes, by the cosine of caption and image (embed.text)."""

    min_score: Optional[float] = Field(None, ge=-1.0, le=1.0)  # remove pairs scoring below (DataComp-style threshold)
    # keep this fraction of the scored pairs that earlier curation left, the best-agreeing first
    # (DataComp's "CLIP score, top 30%": 0.3); ties at the cut are kept
    keep_top_fraction: Optional[float] = Field(None, gt=0.0, le=1.0)
    missing: Literal["keep", "remove"] = "keep"  # a sample without a caption (no score)

    @model_validator(mode="after")
    def _some_rule(self) -> "ClipScoreConfig":
        if self.min_score is None and self.keep_top_fraction is None and self.missing == "keep":
            raise ValueError("clip_score removes nothing: set clip_score.min_score, clip_score.keep_top_fraction "
                             "or clip_score.missing=remove")
        return self
