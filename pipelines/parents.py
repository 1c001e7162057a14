"""The earlier runs an extension reads (`ssl-prune extend`): what their manifests say, and the
few files of theirs it takes (centroids, recorded thresholds, survivors, shard sizes and bands).
Their outputs are only ever read."""

from __future__ import annotations

from dataclasses import dataclass

from prune import schema
from prune.io.storage import OutputDir


class ParentMismatch(ValueError):
    """The parent cannot be extended so (another model, missing records, not a finished run)."""


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


@dataclass
class EarlierRun:
    """What dedup and drift read of an earlier run: its shards and the curation stages whose
    removals (its dedup's included) leave its survivors."""

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


def combine_with_parent(out: OutputDir, parent: OutputDir) -> None:
    """sizes.json: the parent's entries (its own parent's included) and this write's; bands.json:
    per band this write's shards and the parent's (`parent_shards`: their URLs, the parent's own
    parent's first), and the samples of both."""
    sizes = parent.read_json(schema.PRUNED_DIR, schema.SIZES_FILE) | out.read_json(schema.PRUNED_DIR, schema.SIZES_FILE)
    mine = out.read_json(schema.PRUNED_DIR, schema.BANDS_FILE)
    theirs = {b["band"]: b for b in parent.read_json(schema.PRUNED_DIR, schema.BANDS_FILE)["bands"]}
    cumulative = 0
    for b in mine["bands"]:
        p = theirs.get(b["band"], {})
        b["parent_shards"] = p.get("parent_shards", []) + [parent.url_of(schema.PRUNED_DIR, s) for s in p.get("shards", [])]
        b["samples_with_parent"] = b["samples"] + p.get("samples_with_parent", p.get("samples", 0))
        cumulative += b["samples_with_parent"]
        b["cumulative_samples_with_parent"] = cumulative
    mine["parent"] = parent.url
    out.write_json(sizes, schema.PRUNED_DIR, schema.SIZES_FILE)
    out.write_json(mine, schema.PRUNED_DIR, schema.BANDS_FILE)
