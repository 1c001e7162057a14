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


def _hash64(seed: int, shard: str, keys, salt: bytes) -> np.ndarray:
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
        return (_hash64(seed, shard, keys, b"random") >> np.uint64(32)).astype(np.float64) / _U32


def policy_class(policy: str | type[Policy]) -> type[Policy]:
    """A policy's class from its name, or the class itself. Tasks get the class, resolved on the
    driver: a policy registered by the user's own code is not registered in a Ray worker."""
    return policy if isinstance(policy, type) else POLICIES.get(policy)


def priorities(policy: str | type[Policy], distance: np.ndarray, shard: str, keys, seed: int) -> np.ndarray:
    """uint64 priority per sample; distance NaN (failed samples) gives priority 0 (never used)."""
    d = np.asarray(distance, dtype=np.float64)
    value = np.nan_to_num(policy_class(policy).value(d, shard, keys, seed), nan=0.0)
    high = np.floor(value * _U32).astype(np.uint64) << np.uint64(32)
    low = _hash64(seed, shard, keys, b"tiebreak") >> np.uint64(32)
    return high | low


def block_priorities(
    policy: str | type[Policy], seed: int, balanced: bool, shard: str, keys, distance: np.ndarray, cluster: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One shard's ok samples -> (priority, selection group): the group is the cluster when
    `balanced`, else 0. The select stage and `evaluate` both call this, shard by shard."""
    prio = priorities(policy, np.asarray(distance, np.float64), shard, list(keys), seed)
    groups = np.asarray(cluster).astype(np.int64) if balanced else np.zeros(len(prio), np.int64)
    return prio, groups
