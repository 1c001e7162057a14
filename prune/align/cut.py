"""The exact score above which a top fraction lies, from two histogram passes (no sort, no list
of every score on one machine).

Each float32 score maps to a uint32 key in the same order (`order_keys`); a pass counts the keys'
high 16 bits, the driver finds the bin that holds the n-th largest, a second pass counts the low 16
bits inside that bin, and the n-th largest key, so the score, is then exact.
"""

from __future__ import annotations

import numpy as np

BINS = 1 << 16


def order_keys(x: np.ndarray) -> np.ndarray:
    """float32 -> uint32 in the same order (negative floats flipped, positive ones offset)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return np.where(bits >> 31 == 1, ~bits, bits | np.uint32(1 << 31)).astype(np.uint32)


def key_value(key: int) -> float:
    """The float32 of an `order_keys` key."""
    bits = np.uint32(key)
    raw = np.uint32(bits & np.uint32(0x7FFFFFFF)) if bits >> 31 == 1 else np.uint32(~bits)
    return float(np.array([raw], np.uint32).view(np.float32)[0])


def high_histogram(scores: np.ndarray) -> np.ndarray:
    return np.bincount(order_keys(scores) >> 16, minlength=BINS).astype(np.int64)


def low_histogram(scores: np.ndarray, high: int) -> np.ndarray:
    keys = order_keys(scores)
    return np.bincount(keys[(keys >> 16) == high] & 0xFFFF, minlength=BINS).astype(np.int64)


def nth_largest_bin(hist: np.ndarray, n: int) -> tuple[int, int]:
    """(the bin holding the n-th largest, 1-based; how many lie in higher bins)."""
    above = np.cumsum(hist[::-1])
    i = int(np.searchsorted(above, n))  # the first position (from the top) where n are reached
    return BINS - 1 - i, int(above[i - 1]) if i else 0


def keep_count(fraction: float, n: int) -> int:
    """How many of n a top fraction keeps: the nearest whole number, at least one when n > 0."""
    return min(n, max(1 if n else 0, int(np.floor(fraction * n + 0.5))))
