"""Settings of the selection: the `select` section of a config."""

from __future__ import annotations

from pydantic import Field, field_validator

from prune import schema
from prune.settings import Section


class SelectConfig(Section):
    keep_fraction: float = Field(0.7, gt=0.0, le=1.0)
    policy: str = schema.POLICY_HARD  # a registered policy (prune/select/policies.py): hard, easy, random, ...
    balanced: bool = False  # apply the policy within each cluster instead of globally
    seed: int = 0

    @field_validator("policy")
    @classmethod
    def _registered(cls, value: str) -> str:
        from prune.select.policies import POLICIES

        return POLICIES.check(value)
