"""Which caption each sample of the web-like pool gets: the kinds drawn to the exact mix, which
copies carry their original's caption, and each text from its own seeded generator.

Apart from prune/demo/web_like.py (the pool's images and files) so that each stays one concern.
"""

from __future__ import annotations

import numpy as np

from prune.demo.captions import CAPTION_KINDS, SAYS_NOTHING, Caption, make_caption

KIND_ORIGINAL = "original"  # a Fashion-MNIST train image, used once
KIND_COPY = "copy"  # an altered near-copy of a popular original that is itself in the pool
KIND_JUNK = "junk"  # off-distribution: noise, flat colour, stripes, checkerboard, gradient
KINDS = (KIND_ORIGINAL, KIND_COPY, KIND_JUNK)

_CAPTION_STREAM = 0xCA9


def apportion(total: int, weights: np.ndarray) -> list[int]:
    """Split `total` in proportion to `weights` (largest remainders, ties to the first):
    non-increasing weights give non-increasing parts."""
    if total <= 0 or len(weights) == 0:
        return [0] * len(weights)
    exact = total * weights / weights.sum()
    parts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - parts), kind="stable")[: total - parts.sum()]:
        parts[i] += 1
    return parts.tolist()


class CaptionPlan:
    """Which kind of caption each sample gets, which copies carry their original's, and the texts.

    The plan (kinds, who copies whom) is drawn once from (seed, _CAPTION_STREAM, 0); each
    sample's text from its own generator, (seed, _CAPTION_STREAM, 1, position), so a text does
    not depend on the order the samples are written in, and a copy's original's text is the
    same whenever it is made.
    """

    def __init__(self, items: list[dict], images: np.ndarray, mix: dict, copy_same_caption: float, seed: int):
        self.items, self.images, self.seed = items, images, seed
        self.kinds, self.copied_from = plan_captions(
            items, mix, copy_same_caption, np.random.default_rng([seed, _CAPTION_STREAM, 0]))
        self._originals: dict[int, Caption] = {}  # position -> caption, for originals whose copies carry it

    def at(self, pos: int, label: int, pixels: np.ndarray) -> tuple[Caption, bool]:
        """The caption of the sample at `pos` (class `label`, these pixels), and whether it is its original's."""
        source = self.copied_from[pos]
        if source is None:
            return self._make(pos, label, pixels), False
        if source not in self._originals:
            self._originals[source] = self._make(source, label, self.images[self.items[source]["index"]])
        return self._originals[source], True

    def _make(self, pos: int, label: int, pixels: np.ndarray) -> Caption:
        return make_caption(label, pixels, self.kinds[pos], np.random.default_rng([self.seed, _CAPTION_STREAM, 1, pos]))


def plan_captions(items: list[dict], mix: dict, copy_same_caption: float, rng) -> tuple[list[str], list]:
    """Each position's caption kind, and for copies that carry their original's caption, the
    original's position (else None).

    The originals and copies get exactly apportion(n, mix) captions of each kind, shuffled;
    junk gets the say-nothing kinds in their proportions. Then each copy drawn to carry its
    original's caption takes its original's kind, trading kinds with a random sample of no
    family (an original without copies, or a copy that keeps its own caption), which keeps the
    counts exact.
    """
    kinds: list = [None] * len(items)
    garment = [i for i, it in enumerate(items) if it["kind"] != KIND_JUNK]
    junk = [i for i, it in enumerate(items) if it["kind"] == KIND_JUNK]
    says_nothing = np.array([mix[k] for k in SAYS_NOTHING])
    for positions, names, weights in (
        (garment, CAPTION_KINDS, np.array([mix[k] for k in CAPTION_KINDS])),
        (junk, SAYS_NOTHING, says_nothing if says_nothing.sum() > 0 else np.array([1.0, 0.0, 0.0])),
    ):
        drawn = np.repeat(np.arange(len(names)), apportion(len(positions), weights))[rng.permutation(len(positions))]
        for pos, k in zip(positions, drawn.tolist()):
            kinds[pos] = names[k]

    source_of = {it["index"]: i for i, it in enumerate(items) if it["kind"] == KIND_ORIGINAL}
    copies = [i for i, it in enumerate(items) if it["kind"] == KIND_COPY]
    carry = [i for i, u in zip(copies, rng.random(len(copies)).tolist()) if u < copy_same_caption]
    pinned = set(carry) | {source_of[items[i]["index"]] for i in copies}
    free: dict[str, list[int]] = {k: [] for k in CAPTION_KINDS}
    for i in garment:
        if i not in pinned:
            free[kinds[i]].append(i)
    copied_from: list = [None] * len(items)
    for i in carry:
        source = source_of[items[i]["index"]]
        need, have = kinds[source], kinds[i]
        if need != have:
            if not free[need]:
                continue  # nothing left to trade with: this copy keeps a caption of its own
            pool = free[need]
            j = int(rng.integers(len(pool)))
            other = pool[j]
            pool[j] = pool[-1]
            pool.pop()
            kinds[other], kinds[i] = have, need
            free[have].append(other)
        copied_from[i] = source
    return kinds, copied_from
