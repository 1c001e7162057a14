"""Settings of the selection: the `select` section of a config."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from prune import schema
from prune.settings import Section, counted_when

BUDGET_PROPORTIONAL = "proportional"

# settings that only some budgets or orders read: counted where they are read, so that a no-op
# setting changes no fingerprint (and selections made before it existed keep theirs)
_BUDGETED = counted_when(lambda s: s.balanced and s.budget != BUDGET_PROPORTIONAL)
_DBP = counted_when(lambda s: s.balanced and s.budget == "dbp")
_STRATIFIED = counted_when(lambda s: s.policy == schema.POLICY_STRATIFIED)
_AUTO = counted_when(lambda s: s.policy == "auto")


class SelectConfig(Section):
    """Which samples are kept: a policy's order, globally or within each cluster under a budget."""

    keep_fraction: float = Field(0.7, gt=0.0, le=1.0)  # the share of the input's samples kept
    # the order within a group, a registered policy (prune/select/policies.py), or auto: the rule the
    # pool's distance tail picks (prune/select/auto.py) sets policy, balanced and budget at run time
    policy: str = schema.POLICY_HARD
    balanced: bool = False  # select within each cluster (with `budget`) instead of globally
    # with `balanced`: how many each cluster keeps (prune/select/budgets.py): proportional (f of each),
    # capped_equal (Vo et al. 2024) or dbp (Abbas et al. 2024)
    budget: Annotated[str, _BUDGETED] = BUDGET_PROPORTIONAL
    dbp_temperature: Annotated[float, _DBP] = Field(0.1, gt=0.0)  # dbp: softmax temperature of the cluster complexity
    dbp_neighbours: Annotated[int, _DBP] = Field(20, ge=1)  # dbp: nearest prototypes averaged for d_inter
    dbp_min_per_cluster: Annotated[int, _DBP] = Field(0, ge=0)  # dbp: samples every non-empty cluster keeps at least
    strata: Annotated[int, _STRATIFIED] = Field(50, ge=1)  # stratified: equal-width distance strata per group (CCS uses 50)
    drop_hardest: Annotated[float, _STRATIFIED] = Field(0.0, ge=0.0, lt=1.0)  # stratified: the hardest share kept last (CCS's beta)
    # auto: p99 / p50 of the prototype distances at or above which the pool is treated as web-like
    # (measured for the shipped encoders; `benchmarks/auto_rule.py` prints it for your embeddings)
    auto_tail_ratio: Annotated[float, _AUTO] = Field(3.1, gt=1.0)
    seed: int = 0  # the random policy's order and every policy's tie-breaks

    @field_validator("policy")
    @classmethod
    def _registered(cls, value: str) -> str:
        from prune.select.auto import AUTO
        from prune.select.policies import POLICIES

        return value if value == AUTO else POLICIES.check(value)

    @property
    def is_auto(self) -> bool:
        return self.policy == "auto"

    def resolved(self, choice) -> "SelectConfig":
        """These settings with what an `AutoChoice` (prune/select/auto.py) sets."""
        return self.model_copy(update=choice.settings)

    @field_validator("budget")
    @classmethod
    def _budget_registered(cls, value: str) -> str:
        from prune.select.budgets import BUDGETS

        return BUDGETS.check(value)

    def make_budget(self):
        """The budget across clusters this selection uses (proportional on one group when global)."""
        from prune.select.budgets import BUDGETS

        if not self.balanced or self.budget != "dbp":
            return BUDGETS.get(self.budget if self.balanced else BUDGET_PROPORTIONAL)()
        return BUDGETS.get("dbp")(self.dbp_temperature, self.dbp_neighbours, self.dbp_min_per_cluster)

