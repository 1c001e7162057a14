"""Byte spans copied between files: from a local file by position, from any other by seek and read."""

from __future__ import annotations

import io
import random

import pytest

from prune.io.span_copy import copy_spans, scatter_spans


@pytest.mark.parametrize("window,max_gap", [(4096, 512), (1 << 20, 1 << 20)])
def test_scatter_spans_sends_each_file_its_spans_in_offset_order(tmp_path, window, max_gap):
    """Spans in any order to several files, in windows (small ones force many, a span larger than a
    window goes on its own, a wide gap starts a new one): each file gets exactly its spans' bytes."""
    rng = random.Random(0)
    raw = bytes(rng.getrandbits(8) for _ in range(200_000))
    (tmp_path / "src").write_bytes(raw)
    offsets = sorted(rng.sample(range(0, 190_000, 10), 300))
    spans = [(o, min(rng.choice([1, 7, 100, 900, 6000]), 200_000 - o)) for o in offsets]
    spans = [s for i, s in enumerate(spans) if i == len(spans) - 1 or s[0] + s[1] <= spans[i + 1][0]]  # no overlaps
    routes = [(o, n, rng.choice("abc")) for o, n in spans]
    rng.shuffle(routes)
    # a local source is read by position (copy_spans) into memory or local files; any other in windows
    for src, to_files in ((open(tmp_path / "src", "rb"), False), (io.BytesIO(raw), False),
                          (open(tmp_path / "src", "rb"), True)):
        dsts = {k: open(tmp_path / f"dst-{k}", "w+b") if to_files else io.BytesIO() for k in "abc"}
        written = scatter_spans(src, routes, dsts, window=window, max_gap=max_gap)
        for k in "abc":
            want = b"".join(raw[o : o + n] for o, n, key in sorted(routes) if key == k)
            dsts[k].flush()
            got = (tmp_path / f"dst-{k}").read_bytes() if to_files else dsts[k].getvalue()
            assert got == want and written[k] == len(want)
    with pytest.raises(EOFError):
        scatter_spans(io.BytesIO(raw), [(199_990, 20, "a")], {"a": io.BytesIO()})


@pytest.mark.parametrize("buffer_size", [64, 1000, 1 << 20])
def test_copy_spans_gathers_spans_through_a_buffer_of_any_size(tmp_path, buffer_size):
    """Spans smaller and larger than the buffer, adjacent ones merged, from a local file (read by
    position) and from a file object without a descriptor: the same bytes, in the order given."""
    rng = random.Random(1)
    raw = bytes(rng.getrandbits(8) for _ in range(50_000))
    (tmp_path / "src").write_bytes(raw)
    spans = [(10, 5), (15, 300), (4000, 2500), (100, 1), (49_000, 1000), (7000, 0)]
    want = b"".join(raw[o : o + n] for o, n in spans)
    for src in (open(tmp_path / "src", "rb"), io.BytesIO(raw)):
        dst = io.BytesIO()
        assert copy_spans(src, dst, spans, buffer_size=buffer_size) == len(want)
        assert dst.getvalue() == want
        with pytest.raises(EOFError):
            copy_spans(src, io.BytesIO(), [(49_990, 20)], buffer_size=buffer_size)
