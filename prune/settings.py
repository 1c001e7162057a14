"""What every settings model shares: strict sections, the config error, fingerprints, registries.

Each concern's settings live beside its code (prune/embed/settings.py, prune/cluster/settings.py,
...); the run config that composes them, and YAML loading, belong to the CLI (pipelines/cli).
A registry maps a name from the config (a policy, a backend) to the class that registered itself
under it, so the config can check a name against what is registered and list the known ones.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Generic, Optional, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict


class ConfigError(ValueError):
    """A config problem, with a message that names the key at fault."""


@dataclass(frozen=True)
class Fingerprinted:
    """How one setting enters the fingerprint of the outputs it shapes, declared beside the field
    (`Annotated[type, PLACEMENT]`, `Annotated[type, counted_when(...)]`); a field without it counts.

    `counts=False`: it only places work (tasks, threads, batch sizes) and the outputs are the same
    whatever it is, so changing it re-runs nothing. `when`: it counts only while this holds of its
    section; elsewhere it is a no-op, left out so that outputs made before it existed keep theirs.
    """

    counts: bool = True
    when: Optional[Callable[[Any], bool]] = None


PLACEMENT = Fingerprinted(counts=False)


def counted_when(condition: Callable[[Any], bool]) -> Fingerprinted:
    return Fingerprinted(when=condition)


class Section(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def fingerprinted(self) -> dict:
        """The settings the outputs depend on, in field order: what a stage's fingerprint hashes
        of this section (each field's `Fingerprinted` marker says whether it counts)."""
        values = self.model_dump()
        for name, info in type(self).model_fields.items():
            for mark in info.metadata:
                if isinstance(mark, Fingerprinted) and not (mark.counts and (mark.when is None or mark.when(self))):
                    values.pop(name, None)
        return values


def fingerprint(*parts) -> str:
    """A short stable hash of config sections: what a stage's outputs were made with."""
    blob = json.dumps(
        [p.model_dump() if isinstance(p, BaseModel) else p for p in parts], sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> class, filled by the classes themselves (`@REGISTRY.register`)."""

    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, cls: T) -> T:
        name = cls.name
        if name in self._entries and self._entries[name] is not cls:
            raise ValueError(f"{self.what} {name!r} is registered twice ({self._entries[name]!r}, {cls!r})")
        self._entries[name] = cls
        return cls

    def unregister(self, name: str) -> None:
        """Forget a name (a plugin's or a test's teardown); unknown names are ignored."""
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> T:
        """The class registered as `name`; an unknown name lists the known ones."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.what} {name!r}; known: {', '.join(self.names())}")
        return self._entries[name]

    def check(self, name: str) -> str:
        """A pydantic validator body: the name itself when registered."""
        self.get(name)
        return name


def _not_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _clean_extensions(value: list[str]) -> list[str]:
    cleaned = [v.lower().lstrip(".") for v in value]
    if not cleaned or any(not v or "/" in v for v in cleaned):
        raise ValueError("must be a non-empty list of extensions such as jpg, png")
    return cleaned


NonEmptyStr = Annotated[str, AfterValidator(_not_empty)]
Extensions = Annotated[list[str], AfterValidator(_clean_extensions)]
