"""Shard arrivals in the streaming embed stage: a shard is handed to finalize once, when its rows are in."""

from __future__ import annotations

from pipelines.embed_staging import ShardArrivals


def test_a_shard_looks_complete_once_all_its_rows_are_in():
    a = ShardArrivals()
    assert not a.add("00000", 40, 100)
    assert a.add("00001", 10, 10)  # all of 00001 in one staged file: complete at once
    assert a.submitted == {"00001"}
    assert not a.add("00000", 59, 100)
    assert a.add("00000", 1, 100)  # the last row: complete
    assert not a.add("00000", 5, 100)  # rows a retried task wrote again never submit it twice
    assert a.arrived == {"00000": 105, "00001": 10}


def test_a_shard_that_could_not_be_read_completes_on_its_one_row():
    a = ShardArrivals()
    assert a.add("00002", 1, 0)  # the single row standing for the unreadable shard (size 0)
    assert not a.add("00002", 1, 0)
