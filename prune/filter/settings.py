"""Settings of the basic filter: the `filter` section of a config. Each rule is off at its default."""

from __future__ import annotations

from typing import Optional

from pydantic import Field, field_validator

from prune.settings import Section


class FilterConfig(Section):
    """DataComp's basic filtering, on the metadata img2dataset writes beside each tar."""

    min_image_side: int = Field(0, ge=0)  # the source image's shorter side, in pixels (0: off)
    max_aspect_ratio: Optional[float] = Field(None, ge=1.0)  # longer / shorter side (None: off; DataComp: 3)
    min_caption_words: int = Field(0, ge=0)  # words in the caption (0: off; DataComp: 2 words and 5 characters)
    caption_blocklist: Optional[str] = None  # a regular expression; a caption it finds (any case) is removed

    @field_validator("caption_blocklist")
    @classmethod
    def _compiles(cls, value: Optional[str]) -> Optional[str]:
        """Checked by the engine that runs it (Arrow's RE2: no look-around, no back-references)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if value is not None:
            try:
                pc.match_substring_regex(pa.array([""]), value, ignore_case=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ValueError(f"not a regular expression RE2 runs (no look-around or back-references): {exc}") from None
        return value
