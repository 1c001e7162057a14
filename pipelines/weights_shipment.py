"""The driver's copy of the weights, to every node that lacks one: once per node, never from the hub.

The driver found (or fetched) the weights in its Hugging Face cache (prune/embed/hub.py). When
`embed.shared_cache` says every node mounts that cache, the actors load from it and nothing moves.
Otherwise each file goes into Ray's object store once; an actor whose node finds the weights itself
(its own cache, a baked image) loads those, and one that does not pulls the files (Ray moves an
object to a node once, however many actors there read it) and lays them out in the cache layout
under a node-local directory, so the backend finds them exactly as it would in its own cache.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from dataclasses import dataclass
from typing import Optional

import numpy as np
import ray

from prune.embed.backends import Embedder
from prune.embed.errors import WeightsNotFoundError
from prune.embed.hub import Fetched
from prune.embed.settings import EmbedConfig

NODE_CACHE = "ssl-prune-weights"  # under the node's temp directory, one folder per Ray node


@dataclass(frozen=True)
class WeightsShipment:
    """Each cache file's path relative to the cache root, its size, and its bytes in the object store;
    plus the small pointer files (refs/main) that make the layout a cache huggingface_hub reads."""

    files: tuple[tuple[str, int, ray.ObjectRef], ...]
    pointers: tuple[tuple[str, str], ...]


def ship(files: list[Fetched], cfg: EmbedConfig) -> Optional[WeightsShipment]:
    """The shipment for the actors, or None where they need none: no cache files (a path, random
    init), a shared cache, or a one-node cluster (the actors share the driver's disk)."""
    if not files or cfg.shared_cache or sum(n["Alive"] for n in ray.nodes()) <= 1:
        return None
    return WeightsShipment(
        files=tuple((f.relative, f.size, ray.put(np.fromfile(f.path, dtype=np.uint8))) for f in files),
        pointers=tuple(sorted({_pointer(f.relative) for f in files if _pointer(f.relative)})),
    )


def _pointer(relative: str) -> tuple[str, str] | tuple[()]:
    """`models--org--repo/snapshots/<commit>/<file>` -> (`models--org--repo/refs/main`, `<commit>`)."""
    parts = relative.split(os.sep)
    if len(parts) >= 4 and parts[1] == "snapshots":
        return (os.path.join(parts[0], "refs", "main"), parts[2])
    return ()


def weights_here(backend: type[Embedder], cfg: EmbedConfig, shipment: Optional[WeightsShipment]) -> EmbedConfig:
    """`cfg` as this actor loads it: unchanged when its node finds the weights, else pointing at the
    shipment laid out in this node's own directory (written once per node, atomically)."""
    if shipment is None:
        return cfg
    try:
        backend.find_weights(cfg)
        return cfg
    except WeightsNotFoundError:
        pass
    root = os.path.join(tempfile.gettempdir(), NODE_CACHE, ray.get_runtime_context().get_node_id()[:16])
    for relative, commit in shipment.pointers:  # rewritten whenever it differs: it names the snapshot
        path = os.path.join(root, relative)
        if not (os.path.isfile(path) and open(path).read() == commit):
            _write(path, commit.encode())
    for relative, size, ref in shipment.files:
        path = os.path.join(root, relative)
        if not (os.path.isfile(path) and os.path.getsize(path) == size):  # a snapshot path names its commit
            _write(path, memoryview(ray.get(ref)))
    return cfg.model_copy(update={"cache_dir": root})


def _write(path: str, data) -> None:
    """Atomically: another actor on this node may be writing the same file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
