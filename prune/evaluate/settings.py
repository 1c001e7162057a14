"""Settings of `evaluate`: the `evaluate` section (policies, keep fractions, seeds, classifiers)."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from prune import schema
from prune.dedup.settings import DedupConfig
from prune.select.auto import AUTO
from prune.select.settings import SelectConfig
from prune.settings import PLACEMENT, Section


class LinearProbeConfig(Section):
    """Regularized multinomial logistic regression, solved to convergence (prune/evaluate/probes.py)."""

    weight_decay: float = Field(1e-4, ge=0.0)  # L2 penalty on the weights
    max_iter: int = Field(300, ge=1)  # L-BFGS iterations


class CnnConfig(Section):
    """The small CNN trained on each kept subset's pixels (3 conv blocks, a 128-unit dense head)."""

    epochs: int = Field(5, ge=1)  # passes over the kept subset (without `steps`)
    min_steps: int = Field(200, ge=0)  # small subsets still get this many steps
    steps: Optional[int] = Field(None, ge=1)  # every subset trains exactly this many steps (overrides the two above)
    batch_size: int = Field(128, ge=1)  # images per step
    lr: float = Field(2e-3, gt=0.0)  # the optimizer's learning rate
    width: int = Field(32, ge=1)  # channels of the middle conv block (the first has half, the last twice)
    image_size: int = Field(28, ge=8)  # the crop the CNN is trained and scored on, in pixels
    augment: bool = True  # a random 2-pixel shift and horizontal flip per image


class PretrainConfig(Section):
    """The pretraining judge (classifier `clip`): a fresh small CLIP trained by open_clip_train on each
    kept subset's shards for the same number of samples seen, scored zero-shot and by retrieval. The
    model's settings are the arguments of prune/evaluate/pretrain.py's tiny_clip_config."""

    samples_seen: int = Field(30000, ge=1)  # the same for every subset (DataComp's fixed compute)
    batch_size: int = Field(50, ge=1)  # image-caption pairs per step
    epochs: int = Field(5, ge=1)  # open_clip_train epochs: the checkpoints a killed training resumes from
    lr: float = Field(2e-3, gt=0.0)  # open_clip_train's --lr
    warmup: Optional[int] = Field(None, ge=0)  # steps (None: a tenth of them)
    wd: float = Field(0.2, ge=0.0)  # open_clip_train's --wd (weight decay)
    threads: int = Field(1, ge=1)  # torch threads per training (one training per `concurrency` slot)
    timeout_s: Annotated[Optional[float], PLACEMENT] = Field(None, gt=0)  # a training past this is killed; a re-run resumes it
    image_size: int = Field(32, ge=8)  # the ViT's input; the images are resized to it
    patch_size: int = Field(4, ge=1)  # the ViT's patches, in pixels (divides image_size)
    width: int = Field(64, ge=8)  # both towers
    layers: int = Field(2, ge=1)  # both towers
    embed_dim: int = Field(64, ge=8)  # the shared image-text embedding
    context_length: int = Field(16, ge=4)  # caption tokens (start and end included); longer captions are cut
    keep_shards: Annotated[bool, PLACEMENT] = False  # keep each subset's tars once its trainings are scored
    n_pairs: int = Field(1000, ge=1)  # held-out test pairs (image, its .txt caption) for retrieval recall
    pairs_seed: int = 0  # which held-out pairs are drawn


class EvaluateSection(Section):
    """The grid: every policy at every keep fraction and seed, each subset scored by every classifier."""

    keep_fractions: list[float] = [0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0]  # each in (0, 1]
    # a registered policy (global), or a budget prefix + one (the policy within each cluster, under
    # that budget): balanced- (proportional), capped- (capped_equal), dbp-
    policies: list[str] = [schema.POLICY_HARD, schema.POLICY_EASY, schema.POLICY_RANDOM,
                           schema.BALANCED_PREFIX + schema.POLICY_HARD, schema.BALANCED_PREFIX + schema.POLICY_EASY]
    seeds: list[int] = [0, 1, 2]  # each policy's selection and each training run once per seed
    # linear: a probe on the frozen embeddings; cnn: a small CNN on the pixels; clip: the pretraining
    # judge (a CLIP trained on the kept shards, scored zero-shot and by retrieval)
    classifiers: list[Literal["linear", "cnn", "clip"]] = ["linear", "cnn"]
    pool_size: Optional[int] = Field(None, ge=1)  # a random subset of the train shards (None: all)
    pool_seed: int = 0  # which random subset pool_size draws
    label_field: str = "label"  # key in each sample's .json member
    concurrency: int = Field(2, ge=1)  # classifier trainings running at once (Ray tasks)
    linear: LinearProbeConfig = LinearProbeConfig()
    cnn: CnnConfig = CnnConfig()
    clip: PretrainConfig = PretrainConfig()
    # the zero-shot prompts' class names, by label (label i is class_names[i]); the clip judge needs them
    class_names: Optional[list[str]] = None
    # in a combination with caption agreement (caption+<policy>, <policy>+caption): the share of the
    # pool (caption first) or of the policy's pick (caption last) that caption agreement keeps
    caption_share: float = Field(0.7, gt=0.0, le=1.0)
    auto_tail_ratio: float = Field(SelectConfig.model_fields["auto_tail_ratio"].default, gt=1.0)  # policy auto's threshold
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
            if name in ("oracle", "caption-oracle", "caption"):  # the label oracles (the ceilings); caption agreement alone
                continue
            name = name.removeprefix("caption+").removesuffix("+caption").removeprefix("dedup+")
            if name == AUTO:  # select.policy auto: the rule the pool's distance tail picks
                continue
            prefix = next((p for p in schema.BUDGET_PREFIXES if name.startswith(p)), "")
            POLICIES.check(name.removeprefix(prefix))
        return value

    @field_validator("keep_fractions")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if not value or any(not 0.0 < f <= 1.0 for f in value):
            raise ValueError("must be a non-empty list of fractions in (0, 1]")
        return sorted(set(value))

    @model_validator(mode="after")
    def _clip_needs_class_names(self) -> "EvaluateSection":
        if "clip" in self.classifiers and not self.class_names:
            raise PydanticCustomError("class_names", "the clip classifier's zero-shot prompts need evaluate.class_names "
                                      "(the class name of each label, in label order)", {"key": "class_names"})
        return self


