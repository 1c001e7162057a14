"""`ssl-prune extend PARENT input=NEW output=OUT`: curate new shards against a finished run.

The parent's config (from its manifest) is the job's, with `input`, `output` and any override on
top; a parent embedded by another model or other decode settings is refused in one line. The new
shards are embedded, assigned to the parent's centroids (no refit), deduplicated against each other
and against what the parent kept in the clusters they fall in (never the parent's tars), selected by
the parent's recorded thresholds, and written as shards numbered after the parent's with a
`sizes.json` / `bands.json` that cover both. The parent's outputs are only read. An extension is a
run directory too: it can be extended in turn, and a re-run resumes and reuses like a run.
"""

from __future__ import annotations

from dataclasses import dataclass

from prune import schema
from prune.io.storage import OutputDir

from .executor import stage_fingerprint
from .run import run_stages
from .stage import Context, Stage
from .stages.extend import DriftStage, ExtendSelectStage, ExtendWriteStage, ParentMismatch, ParentPrototypesStage

# settings an extension must share with its parent: what makes an embedding, and the clusters
SAME_AS_PARENT = ("embed", "decode", "image_extensions", "kmeans")


@dataclass
class Parent:
    url: str
    manifest: dict

    @property
    def out(self) -> OutputDir:
        return OutputDir(self.url)

    @property
    def fingerprints(self) -> dict:
        return self.manifest.get("fingerprints", {})

    @property
    def ancestors(self) -> list[str]:
        """This parent and the runs it extends, nearest first."""
        return [self.url, *self.manifest.get("parent", {}).get("ancestors", [])]

    def shard_count(self) -> int:
        return len(self.out.read_json(schema.PRUNED_DIR, schema.SIZES_FILE))


@dataclass
class EarlierRun:
    """What dedup reads of an earlier run: its shards and the curation stages whose removals
    (its dedup's included) leave its survivors."""

    out: OutputDir
    shards: list[str]
    removals: tuple[str, ...]


def earlier_run(url: str) -> EarlierRun:
    from .stage import STAGES

    parent = load_parent(url)
    names = parent.manifest["config"]["stages"]
    removals = tuple(n for n in names[: names.index("select")] if STAGES.get(n).removes)
    shards = sorted(n[: -len(".parquet")] for n in parent.out.listdir(schema.ASSIGN_DIR) if n.endswith(".parquet"))
    return EarlierRun(parent.out, shards, removals)


def load_parent(url: str) -> Parent:
    out = OutputDir(url)
    if not out.exists(schema.MANIFEST):
        raise ParentMismatch(f"{url} has no {schema.MANIFEST}: not a finished ssl-prune run (finish it first)")
    manifest = out.read_json(schema.MANIFEST)
    stages = manifest.get("config", {}).get("stages", [])
    for needed in ("prototypes", "select"):
        if needed not in stages:
            raise ParentMismatch(f"{url} ran stages={stages}: an extension needs a parent with prototypes and select")
    return Parent(url.rstrip("/"), manifest)


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
    """The parent's stage list over the new shards, with the stages that must take the parent's
    decisions replaced (prototypes, select, write) and dedup looking across the boundary."""
    stages = []
    for stage in cfg.stage_list():
        if stage.name == "prototypes":
            stage = ParentPrototypesStage(parent=parent.url, parent_fingerprint=parent.fingerprints.get("prototypes", ""))
        elif stage.name == "select":
            stage = ExtendSelectStage(select=cfg.select, write=cfg.write, parent=parent.url)
        elif stage.name == "write":
            stage = ExtendWriteStage(write=cfg.write, select=cfg.select, parent=parent.url, first_shard=parent.shard_count())
        elif stage.name == "dedup":
            stage.parents = tuple(parent.ancestors)
        elif stage.name == "clip_score" and stage.clip_score.keep_top_fraction is not None:
            # a top fraction is a cut over the parent's pairs: the new pairs are held to that score
            cut = parent.manifest["stages"]["clip_score"]["cut"]
            stage.clip_score = stage.clip_score.model_copy(update={"keep_top_fraction": None, "min_score": cut})
        stages.append(stage)
        if stage.name == "assign":
            stages.append(DriftStage(parent=parent.url))
    return stages


def extend(parent_url: str, overrides: list[str]) -> dict:
    """The job; returns the manifest (which names the parent by URL and fingerprints)."""
    from .cli.config import load_config

    parent = load_parent(parent_url)
    cfg = load_config(None, overrides, base_dict=parent.manifest["config"])
    check_same_settings(cfg, parent)
    stages = extend_stages(cfg, parent)
    record = {"output": parent.url, "fingerprints": parent.fingerprints, "model_id": parent.manifest.get("model_id"),
              "ancestors": parent.ancestors}
    return run_stages(stages, cfg.input, cfg.output, cfg.ray, cfg.model_dump(), extra={"parent": record})
