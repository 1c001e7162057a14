"""Selection policies: the order in which a group's samples are kept, each a registered class.

A policy maps each sample's distance to its prototype (and its identity, for seeded ones) to a
value in [0, 1]; larger is kept first. `priorities` turns it into one uint64 per sample: the high
32 bits the value quantized, the low 32 bits a seeded hash of (shard, key) that breaks ties
deterministically. Adding a policy is one class with `@POLICIES.register` (in its own file,
imported from prune/select/__init__.py); `select.policy` then accepts its name.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from prune import schema
from prune.settings import Registry

_U32 = float(2**32 - 1)


_FNV_PRIME = np.uint64(0x100000001B3)


def _splitmix64(h: np.ndarray) -> np.ndarray:
    """A full-avalanche finalizer, so every output bit depends on every input bit."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def seeded_hash(seed: int, shard: str, keys, salt: bytes) -> np.ndarray:
    """Seeded 64-bit hash of each (shard, key), vectorized over samples.

    FNV-1a over the key's UTF-8 bytes, column by column of a fixed-width byte matrix (a loop
    over key length, not over samples), then splitmix64. The seed, shard and salt enter through
    the start value, a blake2b of them computed once per call.
    """
    start = hashlib.blake2b(f"{seed}\x00{shard}".encode(), digest_size=8, person=salt).digest()
    h = np.full(len(keys), int.from_bytes(start, "little"), dtype=np.uint64)
    if len(keys) == 0:
        return h
    encoded = [k.encode("utf-8") for k in keys]
    raw = np.array(encoded, dtype=bytes)
    width = raw.dtype.itemsize
    matrix = raw.view(np.uint8).reshape(len(keys), width)
    lengths = np.fromiter(map(len, encoded), dtype=np.uint64, count=len(encoded))
    with np.errstate(over="ignore"):
        for col in range(width):
            h = (h ^ matrix[:, col].astype(np.uint64)) * _FNV_PRIME
        h = (h ^ lengths) * _FNV_PRIME  # the zero padding must not make "ab" equal "ab\0"
        return _splitmix64(h)


class Policy(ABC):
    """Within a group, which samples are kept first."""

    name: ClassVar[str]  # the `select.policy` that selects this class
    # True: `value` also takes (groups, strata), the CCS strata of every group (prune/select/strata.py),
    # which the select stage computes in a pass of its own before the priorities
    uses_strata: ClassVar[bool] = False

    @staticmethod
    @abstractmethod
    def value(distance: np.ndarray, shard: str, keys, seed: int) -> np.ndarray:
        """float64 in [0, 1] per sample (NaN for failed samples is fine: they are never kept)."""


POLICIES: Registry[type[Policy]] = Registry("select.policy")


@POLICIES.register
class Hard(Policy):
    """Far from the prototype first: the paper's choice when data is abundant."""

    name = schema.POLICY_HARD

    @staticmethod
    def value(distance, shard, keys, seed):
        return np.clip(distance / 2.0, 0.0, 1.0)


@POLICIES.register
class Easy(Policy):
    """Near the prototype first: the paper's choice when data is scarce."""

    name = schema.POLICY_EASY

    @staticmethod
    def value(distance, shard, keys, seed):
        return np.clip(1.0 - distance / 2.0, 0.0, 1.0)


@POLICIES.register
class Random(Policy):
    """A seeded hash of (shard, key): a uniform random subset, the same for a seed on any cluster."""

    name = schema.POLICY_RANDOM

    @staticmethod
    def value(distance, shard, keys, seed):
        return (seeded_hash(seed, shard, keys, b"random") >> np.uint64(32)).astype(np.float64) / _U32


def policy_class(policy: str | type[Policy]) -> type[Policy]:
    """A policy's class from its name, or the class itself. Tasks get the class, resolved on the
    driver: a policy registered by the user's own code is not registered in a Ray worker."""
    return policy if isinstance(policy, type) else POLICIES.get(policy)


@POLICIES.register
class Stratified(Policy):
    """CCS (Zheng et al. 2023): the hardest share dropped, the distance range cut into equal-width
    strata, filled evenly smallest first, at random inside a stratum. A sample's value is its
    expected round in that round-robin: a seeded uniform u scaled by its stratum's size, so every
    prefix of the order fills the strata evenly (to within sampling noise); exact counts per group
    still come from the cuts. The dropped hardest come after every other sample."""

    name = schema.POLICY_STRATIFIED
    uses_strata = True

    @staticmethod
    def value(distance, shard, keys, seed, groups=None, strata=None):
        u = (seeded_hash(seed, shard, keys, b"stratified") >> np.uint64(32)).astype(np.float64) / (_U32 + 1.0)
        g = np.asarray(groups, np.int64)
        s = strata.stratum_of(g, distance)
        size = strata.sizes[g, np.maximum(s, 0)].astype(np.float64)
        largest = strata.sizes.max(axis=1)[g].astype(np.float64) + 1.0
        kept = 0.5 + 0.5 * (1.0 - u * size / largest)  # in (0.5, 1]: earlier rounds first
        return np.where(s >= 0, kept, 0.5 * u)  # the dropped hardest: (0, 0.5), at random


def priorities(policy: str | type[Policy], distance: np.ndarray, shard: str, keys, seed: int,
               groups: np.ndarray | None = None, strata=None) -> np.ndarray:
    """uint64 priority per sample; distance NaN (failed samples) gives priority 0 (never used).
    `groups` and `strata`: for a policy that `uses_strata`."""
    d = np.asarray(distance, dtype=np.float64)
    cls = policy_class(policy)
    raw = cls.value(d, shard, keys, seed, groups, strata) if cls.uses_strata else cls.value(d, shard, keys, seed)
    value = np.nan_to_num(raw, nan=0.0)
    high = np.floor(value * _U32).astype(np.uint64) << np.uint64(32)
    low = seeded_hash(seed, shard, keys, b"tiebreak") >> np.uint64(32)
    return high | low


def selection_groups(balanced: bool, cluster: np.ndarray) -> np.ndarray:
    """Each sample's selection group: its cluster when `balanced`, else 0."""
    return np.asarray(cluster).astype(np.int64) if balanced else np.zeros(len(cluster), np.int64)


def block_priorities(
    policy: str | type[Policy], seed: int, balanced: bool, shard: str, keys, distance: np.ndarray, cluster: np.ndarray,
    strata=None,
) -> tuple[np.ndarray, np.ndarray]:
    """One shard's ok samples -> (priority, selection group). The select stage and `evaluate` both
    call this, shard by shard; `strata`: the groups' CCS strata, for a policy that uses them."""
    groups = selection_groups(balanced, cluster)
    prio = priorities(policy, np.asarray(distance, np.float64), shard, list(keys), seed, groups, strata)
    return prio, groups
