"""`ssl-prune extend PARENT input=NEW output=OUT`: curate new shards against a finished run.

The parent's config (from its manifest) is the job's, with `input`, `output` and any override on
top; a parent embedded or clustered otherwise is refused in one line. The run's own stages do the
work, each told of the parent: prototypes copies the parent's centroids (no refit), dedup compares
the new samples with each other and with the earlier runs' survivors in the clusters they fall in
(never their tars), select applies the parent's recorded thresholds, write numbers the new shards
after the parent's with a `sizes.json` / `bands.json` that cover both; a drift stage after assign
says whether to refit, and export writes the new kept ids. The parent's outputs are only read. An extension is a run directory too:
it can be extended in turn, and a re-run resumes and reuses like a run.
"""

from __future__ import annotations

from prune.io.storage import OutputDir

from .executor import stage_fingerprint
from .parents import Parent, ParentMismatch
from .stage import STAGES, Context, Stage
from .stages.drift import DriftStage

# settings an extension must share with its parent: what makes an embedding, and the clusters
SAME_AS_PARENT = ("embed", "decode", "image_extensions", "kmeans")


def check_same_settings(cfg, parent: Parent) -> None:
    """One line when the extension would embed or cluster otherwise than its parent did."""
    before = parent.manifest["config"]
    now = cfg.model_dump()
    changed = [k for k in SAME_AS_PARENT if now.get(k) != before.get(k)]
    embed = next((s for s in cfg.stage_list() if s.name == "embed"), None)
    if embed is not None and "embed" in parent.fingerprints:
        fp = stage_fingerprint(embed, [], Context(OutputDir(cfg.output), {}))
        if fp != parent.fingerprints["embed"] and "embed" not in changed:
            changed.append("embed")
    if changed:
        raise ParentMismatch(
            f"{parent.url} was made with other {', '.join(changed)} settings (model {parent.manifest.get('model_id')}): "
            "an extension embeds and clusters as its parent did; drop the override(s) or start a new run")
    if OutputDir(cfg.output).url == parent.out.url:
        raise ParentMismatch(f"output={cfg.output} is the parent itself: an extension writes into its own directory")


def extend_stages(cfg, parent: Parent) -> list[Stage]:
    """The parent's stage list over the new shards, each stage told of the parent, and the drift
    stage after assign."""
    stages = []
    for stage in cfg.stage_list():
        if stage.name == "prototypes":
            stage.parent, stage.parent_fingerprint = parent.url, parent.fingerprints.get("prototypes", "")
        elif stage.name in ("select", "write"):
            stage.parent = parent.url
            if stage.name == "write":
                stage.first_shard = parent.shard_count()
        elif stage.name == "dedup":
            stage.parents = tuple(parent.ancestors)
        elif stage.name == "clip_score" and stage.clip_score.keep_top_fraction is not None:
            # a top fraction is a cut over the parent's pairs: the new pairs are held to that score
            cut = parent.manifest["stages"]["clip_score"]["cut"]
            stage.clip_score = stage.clip_score.model_copy(update={"keep_top_fraction": None, "min_score": cut})
        stages.append(stage)
        if stage.name == "assign":
            stages.append(DriftStage(parent=parent.url))
    if "export" not in [s.name for s in stages]:  # the new kept ids, whatever the parent listed
        stages.append(STAGES.get("export").from_config(cfg))
    return stages


def parent_record(parent: Parent) -> dict:
    """What the extension's manifest says of its parent."""
    return {"output": parent.url, "fingerprints": parent.fingerprints, "model_id": parent.manifest.get("model_id"),
            "ancestors": parent.ancestors}
