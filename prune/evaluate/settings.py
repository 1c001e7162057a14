"""Settings of `evaluate`: the `evaluate` section (policies, keep fractions, seeds, classifiers)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator

from prune import schema
from prune.dedup.settings import DedupConfig
from prune.settings import Section


class LinearProbeConfig(Section):
    """Regularized multinomial logistic regression, solved to convergence (prune/evaluate/probes.py)."""

    weight_decay: float = Field(1e-4, ge=0.0)  # L2 penalty on the weights
    max_iter: int = Field(300, ge=1)  # L-BFGS iterations


class CnnConfig(Section):
    epochs: int = Field(5, ge=1)
    min_steps: int = Field(200, ge=0)  # small subsets still get this many steps
    steps: Optional[int] = Field(None, ge=1)  # every subset trains exactly this many steps (overrides the two above)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0.0)
    width: int = Field(32, ge=1)
    image_size: int = Field(28, ge=8)
    augment: bool = True  # a random 2-pixel shift and horizontal flip per image


class EvaluateSection(Section):
    keep_fractions: list[float] = [0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0]
    # a registered policy (global), or a budget prefix + one (the policy within each cluster, under
    # that budget): balanced- (proportional), capped- (capped_equal), dbp-
    policies: list[str] = [schema.POLICY_HARD, schema.POLICY_EASY, schema.POLICY_RANDOM,
                           schema.BALANCED_PREFIX + schema.POLICY_HARD, schema.BALANCED_PREFIX + schema.POLICY_EASY]
    seeds: list[int] = [0, 1, 2]
    classifiers: list[Literal["linear", "cnn"]] = ["linear", "cnn"]
    pool_size: Optional[int] = Field(None, ge=1)  # a random subset of the train shards (None: all)
    pool_seed: int = 0
    label_field: str = "label"  # key in each sample's .json member
    concurrency: int = Field(2, ge=1)  # classifier trainings running at once (Ray tasks)
    linear: LinearProbeConfig = LinearProbeConfig()
    cnn: CnnConfig = CnnConfig()
    dedup: DedupConfig = DedupConfig()  # SemDeDup of the pool, for the policies named dedup+<policy>
    strata: int = Field(50, ge=1)  # the stratified policy's select.strata
    drop_hardest: float = Field(0.0, ge=0.0, lt=1.0)  # the stratified policy's select.drop_hardest

    def select_options(self) -> dict:
        """The select settings every policy of the grid shares (beyond policy, budget, fraction, seed)."""
        return {"strata": self.strata, "drop_hardest": self.drop_hardest}

    @field_validator("policies")
    @classmethod
    def _registered(cls, value: list[str]) -> list[str]:
        from prune.select.policies import POLICIES

        for name in value:
            if name == "oracle":  # the label oracle: the ceiling, not a policy
                continue
            name = name.removeprefix("dedup+")
            prefix = next((p for p in schema.BUDGET_PREFIXES if name.startswith(p)), "")
            POLICIES.check(name.removeprefix(prefix))
        return value

    @field_validator("keep_fractions")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if not value or any(not 0.0 < f <= 1.0 for f in value):
            raise ValueError("must be a non-empty list of fractions in (0, 1]")
        return sorted(set(value))


