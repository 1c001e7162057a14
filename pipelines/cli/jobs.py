"""The jobs behind the verbs, for users who orchestrate from Python: each maps its config to a
list of stages and hands it to the executor.

    from pipelines.cli import load_config, run
    manifest = run(load_config("configs/demo.yaml", ["select.keep_fraction=0.5"]))
"""

from __future__ import annotations

from pipelines import runtime
from pipelines.executor import execute, preflight
from pipelines.inputs import resolve_shards
from pipelines.run import run_stages
from pipelines.stage import Context
from pipelines.stages.embed import EmbedStage
from pipelines.stages.evaluate import EvaluateStage, EvaluateStats
from pipelines.stages.train_clip import TrainClipStage, TrainClipStats
from pipelines.stages.train_encoder import TrainEncoderStage, TrainStats
from prune import schema
from prune.evaluate.layout import TEST_DIR, TRAIN_DIR
from prune.io.storage import OutputDir

from .config import EvaluateConfig, RunConfig, TrainClipConfig, TrainEncoderConfig


def run(cfg: RunConfig) -> dict:
    """`ssl-prune run`: the configured stages (embed, prototypes, assign, select, write by default);
    returns the manifest."""
    return run_stages(cfg.stage_list(), cfg.input, cfg.output, cfg.ray, cfg.model_dump())


def extend(parent_url: str, overrides: list[str]) -> dict:
    """`ssl-prune extend PARENT input=NEW output=OUT`: new shards curated against a finished run
    (pipelines/extend.py); returns the manifest, which names the parent by URL and fingerprints."""
    from pipelines.extend import check_same_settings, extend_stages, parent_record
    from pipelines.parents import load_parent

    from .config import load_config

    parent = load_parent(parent_url)
    cfg = load_config(None, overrides, base_dict=parent.manifest["config"])
    check_same_settings(cfg, parent)
    return run_stages(extend_stages(cfg, parent), cfg.input, cfg.output, cfg.ray, cfg.model_dump(),
                      extra={"parent": parent_record(parent)})


def train_encoder(cfg: TrainEncoderConfig) -> TrainStats:
    """`ssl-prune train-encoder`: one stage, SimCLR on the input shards."""
    shards = resolve_shards(cfg.input)
    out = OutputDir(cfg.output)
    out.makedirs()
    how = runtime.connect(cfg.ray)
    done = execute([TrainEncoderStage.from_config(cfg)], Context(out, shards, ray=how))
    return done.stats[TrainEncoderStage.name]


def train_clip(cfg: TrainClipConfig) -> TrainClipStats:
    """`ssl-prune train-clip`: one stage, a CLIP (open_clip's model and loss) on the input's image-caption pairs."""
    shards = resolve_shards(cfg.input)
    out = OutputDir(cfg.output)
    out.makedirs()
    runtime.defer(cfg.ray)  # Ray starts only when there is training to do (a complete directory is reused)
    done = execute([TrainClipStage.from_config(cfg)], Context(out, shards))
    return done.stats[TrainClipStage.name]


def evaluate(cfg: EvaluateConfig) -> EvaluateStats:
    """`ssl-prune evaluate`: embed the train and test splits, then the grid of classifier runs."""
    stages = [EmbedStage(cfg.embed, cfg.decode, tuple(cfg.image_extensions), split=name) for name in (TRAIN_DIR, TEST_DIR)]
    stages.append(EvaluateStage(cfg.evaluate, cfg.kmeans, cfg.embed, cfg.decode, tuple(cfg.image_extensions),
                                config=cfg.model_dump()))
    preflight(stages)
    shards = {TRAIN_DIR: resolve_shards(cfg.train_input), TEST_DIR: resolve_shards(cfg.test_input)}
    out = OutputDir(cfg.output)
    out.makedirs()
    how = runtime.connect(cfg.ray)
    splits = {name: Context(out.sub(name), s, ray=how) for name, s in shards.items()}
    try:
        done = execute(stages, Context(out, {}, splits=splits, ray=how), checked=True)
    finally:  # the embed stages' scratch, whether the grid finished or not
        for split in splits.values():
            split.out.remove(schema.STAGING_DIR)
    return done.stats[EvaluateStage.name]
