"""Weights fetched from a Hugging Face-compatible hub, once, on the driver, and verified.

Per-worker downloads hit the hub's rate limits (HTTP 429 per egress address) and fetch the same
600 MB once per node; here the driver fetches each file once with huggingface_hub's own
`hf_hub_download` (its cache layout, its lock, its retries that resume an interrupted transfer
within the run; a run that gives up leaves nothing, and the next one starts the file again) and checks
it against the hub's metadata: the size, and the hash the hub publishes as the file's ETag
(sha256 for LFS files, the git blob sha1 for small ones). A file that does not match is removed
from the cache and refused in one line, so no later run loads it. The actors never download
(they run offline): pipelines/weights_shipment.py hands them the driver's copy.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Optional, Sequence

from prune.embed.errors import WeightsNotFoundError

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")


class WeightsDownloadError(WeightsNotFoundError):
    """The weights could not be fetched, or what was fetched does not match the hub's metadata."""


class HubUnreachable(WeightsDownloadError):
    """No connection to the hub at all (no network, a firewall): `embed.download: auto` then
    falls back to the cache-only behaviour and its message."""


@dataclass(frozen=True)
class HubFile:
    """One file a model needs from a hub repo: the first of `names` the repo has (open_clip's
    safetensors alternatives before the .bin it names)."""

    repo_id: str
    names: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.repo_id}/{' or '.join(self.names)}"


@dataclass(frozen=True)
class Fetched:
    """A verified file in the local cache: its path, and where it sits relative to the cache root
    (so a copy on another node can be laid out the same way)."""

    path: str
    cache_root: str
    size: int
    digest: str  # the hub's ETag it was checked against

    @property
    def relative(self) -> str:
        """`models--ORG--REPO/snapshots/<commit>/<file>`: the same on every node whatever the cache's
        root (hf_hub_download returns paths with symlinks resolved, the root may be a symlink)."""
        parts = os.path.normpath(self.path).split(os.sep)
        repo = max((i for i, p in enumerate(parts) if p.startswith(("models--", "datasets--", "spaces--"))),
                   default=None)
        if repo is None or parts[repo + 1: repo + 2] != ["snapshots"]:
            raise ValueError(f"{self.path} is not in a Hugging Face cache's layout")
        return os.path.join(*parts[repo:])


def default_endpoint(endpoint: Optional[str]) -> str:
    from huggingface_hub import constants

    return (endpoint or constants.ENDPOINT).rstrip("/")


def offline_by_environment() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), as huggingface_hub read it at import."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cache_root(cache_dir: Optional[str]) -> str:
    from huggingface_hub import constants

    return os.path.realpath(os.path.expanduser(cache_dir or constants.HF_HUB_CACHE))


def fetch(files: Sequence[HubFile], cache_dir: Optional[str], endpoint: Optional[str]) -> list[Fetched]:
    """Each file once into the Hugging Face cache under `cache_dir`, verified; a file already cached
    with the hub's current ETag is not downloaded again (hf_hub_download's own check)."""
    return [_fetch_one(f, cache_dir, default_endpoint(endpoint)) for f in files]


def locate(files: Sequence[HubFile], cache_dir: Optional[str]) -> Optional[list[Fetched]]:
    """The cached copies of every file (the first of its names present), None if one is missing."""
    from huggingface_hub import try_to_load_from_cache

    found = []
    for want in files:
        paths = [try_to_load_from_cache(want.repo_id, name, cache_dir=cache_dir) for name in want.names]
        path = next((p for p in paths if isinstance(p, str)), None)
        if path is None:
            return None
        found.append(Fetched(path, cache_root(cache_dir), os.path.getsize(path), ""))
    return found


def _fetch_one(want: HubFile, cache_dir: Optional[str], endpoint: str) -> Fetched:
    from httpx2 import TransportError
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, HTTPError

    missing = []
    for name in want.names:
        url = hf_hub_url(want.repo_id, name, endpoint=endpoint)
        try:
            meta = get_hf_file_metadata(url, endpoint=endpoint)
        except EntryNotFoundError:
            missing.append(name)
            continue
        except TransportError as exc:
            raise HubUnreachable(f"the hub at {endpoint} could not be reached ({_one_line(exc)})") from None
        except (HTTPError, OSError, ValueError) as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            hint = " (a gated or private repo: set HF_TOKEN)" if status in (401, 403) else ""
            raise WeightsDownloadError(
                f"could not fetch {want.repo_id}/{name} from {endpoint}{hint}: {_one_line(exc)}") from None
        try:
            path = hf_hub_download(want.repo_id, name, cache_dir=cache_dir, endpoint=endpoint)
        except PermissionError as exc:
            raise WeightsDownloadError(
                f"cannot write {want.repo_id}/{name} into the cache {cache_root(cache_dir)} ({_one_line(exc)}): "
                f"point embed.cache_dir at a writable directory"
            ) from None
        except (HTTPError, OSError, ValueError) as exc:
            raise WeightsDownloadError(
                f"download of {want.repo_id}/{name} from {endpoint} failed: {_one_line(exc)} (huggingface_hub "
                f"retried and resumed it within this run; nothing was kept or loaded, the next run starts it again)"
            ) from None
        digest = verify(path, meta.size, meta.etag, f"{want.repo_id}/{name} from {endpoint}")
        return Fetched(path, cache_root(cache_dir), os.path.getsize(path), digest)
    raise WeightsDownloadError(f"{endpoint} has no {want} in {want.repo_id} (looked for {', '.join(missing)})")


def verify(path: str, size: Optional[int], etag: Optional[str], what: str) -> str:
    """The hub's ETag when the file matches its size and hash; else the file is removed from the
    cache (its snapshot entry and the blob behind it) and WeightsDownloadError says why, in one line."""
    actual = os.path.getsize(path)
    problem = None
    if size is not None and actual != size:
        problem = f"{actual} bytes, the hub says {size}"
    elif etag and (_SHA256.match(etag) or _SHA1.match(etag)):
        got = file_digest(path, git_blob=bool(_SHA1.match(etag)))
        if got != etag:
            kind = "git blob sha1" if _SHA1.match(etag) else "sha256"
            problem = f"{kind} {got[:12]}…, the hub says {etag[:12]}…"
    if problem:
        _remove_cached(path)
        raise WeightsDownloadError(f"{what} is corrupt ({problem}); removed it from the cache, nothing was loaded")
    return etag or ""


def file_digest(path: str, git_blob: bool = False) -> str:
    """sha256 of the file (an LFS file's ETag), or its git blob sha1 (a small file's ETag)."""
    h = hashlib.sha1() if git_blob else hashlib.sha256()
    if git_blob:
        h.update(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _remove_cached(path: str) -> None:
    blob = os.path.realpath(path)
    for p in {path, blob}:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:600]}"
