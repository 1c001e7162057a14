"""Settings of the selection: the `select` section of a config."""

from __future__ import annotations

from pydantic import Field, field_validator

from prune import schema
from prune.settings import Section

BUDGET_PROPORTIONAL = "proportional"


class SelectConfig(Section):
    keep_fraction: float = Field(0.7, gt=0.0, le=1.0)
    policy: str = schema.POLICY_HARD  # the order within a group, a registered policy (prune/select/policies.py)
    balanced: bool = False  # select within each cluster (with `budget`) instead of globally
    # with `balanced`: how many each cluster keeps (prune/select/budgets.py): proportional (f of each),
    # capped_equal (Vo et al. 2024) or dbp (Abbas et al. 2024)
    budget: str = BUDGET_PROPORTIONAL
    dbp_temperature: float = Field(0.1, gt=0.0)  # dbp: softmax temperature of the cluster complexity
    dbp_neighbours: int = Field(20, ge=1)  # dbp: nearest prototypes averaged for d_inter
    dbp_min_per_cluster: int = Field(0, ge=0)  # dbp: samples every non-empty cluster keeps at least
    strata: int = Field(50, ge=1)  # stratified: equal-width distance strata per group (CCS uses 50)
    drop_hardest: float = Field(0.0, ge=0.0, lt=1.0)  # stratified: the hardest share kept last (CCS's beta)
    seed: int = 0

    @field_validator("policy")
    @classmethod
    def _registered(cls, value: str) -> str:
        from prune.select.policies import POLICIES

        return POLICIES.check(value)

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


def select_settings(s: SelectConfig) -> dict:
    """The selection settings its outputs depend on (what the fingerprint hashes). Settings left at
    their no-op values are left out, so runs made before they existed keep their fingerprint."""
    d = s.model_dump()
    unused = {"dbp_temperature", "dbp_neighbours", "dbp_min_per_cluster", "strata", "drop_hardest"}
    if not s.balanced or s.budget == BUDGET_PROPORTIONAL:
        unused.add("budget")
    elif s.budget == "dbp":
        unused -= {"dbp_temperature", "dbp_neighbours", "dbp_min_per_cluster"}
    if s.policy == schema.POLICY_STRATIFIED:
        unused -= {"strata", "drop_hardest"}
    return {k: v for k, v in d.items() if k not in unused}
