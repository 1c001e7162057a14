"""The basic filter's rules on img2dataset metadata: each rule off until set, the first failed
rule as the reason, nothing guessed where a value is missing; its settings named when wrong."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipelines.cli.config import validate_config
from prune import schema
from prune.filter.rules import removal_reasons
from prune.filter.settings import FilterConfig
from prune.settings import ConfigError

from .conftest import small_config

META = pa.table({
    "key": ["a", "b", "c", "d", "e", "f"],
    "original_width": [300, 100, 900, None, 300, 250],
    "original_height": [300, 300, 200, 50, 300, 250],
    "caption": ["a red dress on a model", "shoe", "free SHIPPING today", "a bag", None, "IMG_2031"],
})


def test_each_rule_removes_what_it_names_and_the_first_failed_rule_is_the_reason():
    assert list(removal_reasons(META, FilterConfig())) == [None] * 6  # every rule off
    rules = FilterConfig(min_image_side=200, max_aspect_ratio=3.0, min_caption_words=2, caption_blocklist="free shipping|^img_")
    assert list(removal_reasons(META, rules)) == [
        None,
        schema.STATUS_SMALL_IMAGE,  # 100 px side (also a short caption: the first rule wins)
        schema.STATUS_ASPECT_RATIO,  # 900 x 200 = 4.5
        None,  # a null width: the size rules look at nothing (the 50 px side is not judged alone)
        None,  # a null caption: the caption rules look at nothing
        schema.STATUS_SHORT_CAPTION,  # "IMG_2031": one word, before the blocklist
    ]
    blocklist = removal_reasons(META, FilterConfig(caption_blocklist="free shipping|^img_"))
    assert list(blocklist) == [None, None, schema.STATUS_BLOCKED_CAPTION, None, None, schema.STATUS_BLOCKED_CAPTION]


def test_without_the_columns_nothing_is_removed():
    bare = pa.table({"key": ["a"], "width": [10], "height": [10]})
    assert list(removal_reasons(bare, FilterConfig(min_image_side=20, min_caption_words=3))) == [schema.STATUS_SMALL_IMAGE]
    assert list(removal_reasons(pa.table({"key": ["a"]}), FilterConfig(min_image_side=20))) == [None]


@pytest.mark.parametrize("override, key", [
    ({"filter.caption_blocklist": "(?!safe)porn"}, "filter.caption_blocklist"),  # look-ahead: Python's re, not RE2
    ({"filter.caption_blocklist": r"(\w)\1"}, "filter.caption_blocklist"),  # a back-reference
    ({"filter.max_aspect_ratio": 0.5}, "filter.max_aspect_ratio"),
    ({"filter.min_image_side": -1}, "filter.min_image_side"),
])
def test_a_bad_filter_setting_names_its_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(small_config(tmp_path, tmp_path, **override))


def test_a_removal_is_a_reason_that_is_neither_ok_nor_a_failure():
    assert schema.is_removal(list(schema.REMOVAL_STATUSES)).all()  # every shipped curation stage's reasons
    assert not schema.is_removal([schema.STATUS_OK, *schema.FAILURE_STATUSES, None, ""]).any()
    assert schema.is_removal(["a_new_stage_reason"]).all()  # a new stage brings its own, no list to extend
