"""The driver's copy of the weights, to every node that lacks one: once per node, never from the hub.

The driver found (or fetched) the weights in its Hugging Face cache (prune/embed/hub.py). When
`embed.shared_cache` says every node mounts that cache, the actors load from it and nothing moves.
Otherwise each file goes into Ray's object store (from a memory map: the driver does not read it
into its own heap first), whatever the cluster looks like now: an autoscaler may add the GPU nodes
later. An actor whose node holds the very same files (same commit, same sizes: a baked image)
loads those; any other pulls the files (Ray moves an object to a node once, however many actors
there read it) and, under a lock so one actor per node writes, lays them out in the cache layout
under a node-local directory of that commit, so the backend finds them exactly as in its own cache.
Actors run offline: nothing they load asks the hub.
"""

from __future__ import annotations

import glob
import hashlib
import os
import tempfile
import uuid
from dataclasses import dataclass
from typing import Optional

import numpy as np
import ray

from prune.embed.backends import Embedder
from prune.embed.hub import Fetched, locate
from prune.embed.settings import EmbedConfig

NODE_CACHE = "ssl-prune-weights"  # under the node's temp directory: <node id>/<the files' commits>/


@dataclass(frozen=True)
class WeightsShipment:
    """Each cache file's path relative to the cache root (`models--ORG--REPO/snapshots/<commit>/<file>`),
    its size, and its bytes in the object store."""

    files: tuple[tuple[str, int, ray.ObjectRef], ...]

    def layout(self) -> list[tuple[str, int]]:
        return sorted((relative, size) for relative, size, _ in self.files)

    def pointers(self) -> list[tuple[str, str]]:
        """`models--ORG--REPO/refs/main` -> the commit, for each repo: what makes the layout a cache
        huggingface_hub reads."""
        found = {}
        for relative, _, _ in self.files:
            repo, _, commit, *_ = relative.split(os.sep)
            found[os.path.join(repo, "refs", "main")] = commit
        return sorted(found.items())


def ship(files: list[Fetched], cfg: EmbedConfig, ray_here: bool = False) -> Optional[WeightsShipment]:
    """The shipment for the actors, or None where they need none: no cache files (a path, random
    init), a cache every node mounts, or a Ray this driver started on its own machine (`ray_here`:
    every worker shares the driver's disk, and no autoscaler adds nodes)."""
    if not files or cfg.shared_cache or ray_here:
        return None
    return WeightsShipment(tuple((f.relative, f.size, ray.put(np.asarray(np.memmap(f.path, dtype=np.uint8, mode="r"))))
                                 for f in files))


def weights_here(backend: type[Embedder], cfg: EmbedConfig, shipment: Optional[WeightsShipment]) -> EmbedConfig:
    """`cfg` as this actor loads it: unchanged when its node holds the shipment's very files, else
    pointing at the shipment laid out in this node's own directory (written once per node)."""
    stay_offline()
    if shipment is None:
        return cfg
    local = locate(backend.hub_files(cfg), cfg.cache_dir)
    if local is not None and sorted((f.relative, f.size) for f in local) == shipment.layout():
        return cfg
    key = hashlib.sha256(repr(shipment.layout()).encode()).hexdigest()[:16]
    root = os.path.join(tempfile.gettempdir(), NODE_CACHE, ray.get_runtime_context().get_node_id()[:16], key)
    os.makedirs(root, exist_ok=True)
    from filelock import FileLock  # huggingface_hub's own dependency

    with FileLock(root + ".lock"):  # the first actor on the node writes, the others find the files
        for stale in glob.glob(os.path.join(root, "**", "*.tmp"), recursive=True):
            os.remove(stale)  # a write a killed actor left
        for relative, commit in shipment.pointers():
            _write(os.path.join(root, relative), commit.encode(), len(commit))
        for relative, size, ref in shipment.files:
            _write(os.path.join(root, relative), memoryview(ray.get(ref)), size)
    return cfg.model_copy(update={"cache_dir": root})


def stay_offline() -> None:
    """Nothing this process loads may ask the hub (huggingface_hub read HF_HUB_OFFLINE at import)."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True


def _write(path: str, data, size: int) -> None:
    if os.path.isfile(path) and os.path.getsize(path) == size:
        return  # written by an earlier actor on this node (the directory is the commit's own)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
