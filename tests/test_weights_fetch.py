"""Weights fetched once per cluster: from a Hugging Face-compatible hub served on loopback here.

The hub serves the shipped CLIP (models/fmnist-clip) as `ssl-prune/fmnist-clip`, as open_clip's
`hf-hub:` layout has it; the driver fetches it with huggingface_hub's own download code, checks
size and hash against the hub's metadata, and every actor on every node loads that one copy.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

from prune import schema
from prune.embed.backends import check_weights, make_embedder, model_id_for
from prune.embed.errors import WeightsNotFoundError
from prune.embed.hub import HubFile, WeightsDownloadError, file_digest, locate
from prune.embed.settings import EmbedConfig
from prune.settings import ConfigError

from .conftest import REPO, small_config
from .hub_server import HubServer

SHIPPED = pathlib.Path(REPO) / "models" / "fmnist-clip"
REPO_ID = "ssl-prune/fmnist-clip"
CONFIG, WEIGHTS = "open_clip_config.json", "open_clip_model.safetensors"
FILES = {name: (SHIPPED / name).read_bytes() for name in (CONFIG, WEIGHTS)}


def hub(**faults) -> HubServer:
    return HubServer({REPO_ID: dict(FILES)}, **faults)


def hub_cfg(server: HubServer, cache: pathlib.Path, **kw) -> EmbedConfig:
    return EmbedConfig(pretrained=f"hf-hub:{REPO_ID}", cache_dir=str(cache), hub_endpoint=server.endpoint,
                       **({"download": True} | kw))


def test_a_hub_id_is_fetched_once_verified_and_loads_as_the_directory_does(tmp_path):
    with hub() as server:
        cfg = hub_cfg(server, tmp_path / "hf")
        fetched = check_weights(cfg)
        assert [f.relative.split(os.sep)[-1] for f in fetched] == [CONFIG, WEIGHTS]
        assert all(pathlib.Path(f.path).read_bytes() == FILES[name] for f, name in zip(fetched, (CONFIG, WEIGHTS)))
        assert [len(server.gets(name)) for name in FILES] == [1, 1]
        asked = len(server.requests)
        again = check_weights(cfg)  # a second run finds the cached copy and asks the hub nothing
        assert [f.path for f in again] == [f.path for f in fetched] and len(server.requests) == asked
    # the same weights as the local directory: the same model id (by content), the same vectors
    local = EmbedConfig(pretrained=str(SHIPPED))
    assert model_id_for(cfg) == model_id_for(local)
    a, b = make_embedder(cfg, "cpu"), make_embedder(local, "cpu")
    pixels = np.random.default_rng(0).integers(0, 256, (3, a.preprocess.size, a.preprocess.size, 3), dtype=np.uint8)
    np.testing.assert_array_equal(a.embed(pixels), b.embed(pixels))


def test_a_tag_is_fetched_to_where_open_clip_looks_safetensors_first(tmp_path):
    """ViT-B-32's laion2b_s34b_b79k names laion/CLIP-ViT-B-32-laion2B-s34B-b79K on the hub; the hub here
    holds a stand-in file under open_clip's safetensors name (loading 600 MB is not the point)."""
    stand_in = os.urandom(4096)
    server = HubServer({"laion/CLIP-ViT-B-32-laion2B-s34B-b79K": {"open_clip_model.safetensors": stand_in,
                                                                  "open_clip_pytorch_model.bin": b"never asked"}})
    with server:
        cfg = EmbedConfig(model="ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=str(tmp_path / "hf"),
                          hub_endpoint=server.endpoint)  # download: auto, and this hub is reachable
        (fetched,) = check_weights(cfg)
    assert pathlib.Path(fetched.path).read_bytes() == stand_in and fetched.digest == file_digest(fetched.path)
    assert [r.filename for r in server.requests if r.method == "GET"] == ["open_clip_model.safetensors"]
    from prune.embed.backends.open_clip_backend import resolve_open_clip_weights

    assert resolve_open_clip_weights("ViT-B-32", "laion2b_s34b_b79k", str(tmp_path / "hf")) == fetched.path


def test_an_interrupted_download_resumes_where_it_stopped(tmp_path):
    cut = 12_000_000  # past huggingface_hub's first 10 MiB chunk, which it keeps
    with hub(drop_after={WEIGHTS: cut}) as server:
        fetched = check_weights(hub_cfg(server, tmp_path / "hf"))
        first, resumed = server.gets(WEIGHTS)
    assert first.range is None and resumed.range == f"bytes={10 * 2**20}-"
    assert pathlib.Path(fetched[1].path).read_bytes() == FILES[WEIGHTS]


def test_a_download_that_keeps_failing_is_refused_in_one_line_and_nothing_is_loadable(tmp_path):
    with hub(drop_after={WEIGHTS: 1000}, drop_gets=100) as server:
        with pytest.raises(WeightsDownloadError) as err:
            check_weights(hub_cfg(server, tmp_path / "hf"))
    message = str(err.value)
    assert "\n" not in message and WEIGHTS in message and "starts it again" in message
    assert locate([HubFile(REPO_ID, (WEIGHTS,))], str(tmp_path / "hf")) is None  # no partial file to load
    with hub() as server:  # the hub is back: the next run completes it
        fetched = check_weights(hub_cfg(server, tmp_path / "hf"))
    assert pathlib.Path(fetched[1].path).read_bytes() == FILES[WEIGHTS]


def test_a_corrupt_file_is_refused_in_one_line_and_removed(tmp_path):
    with hub(corrupt={WEIGHTS}) as server:
        with pytest.raises(WeightsDownloadError) as err:
            check_weights(hub_cfg(server, tmp_path / "hf"))
    message = str(err.value)
    assert "\n" not in message and "corrupt" in message and "sha256" in message and "removed" in message
    assert locate([HubFile(REPO_ID, (WEIGHTS,))], str(tmp_path / "hf")) is None
    blobs = list((tmp_path / "hf").glob("models--*/blobs/*"))
    assert not any(b.stat().st_size == len(FILES[WEIGHTS]) for b in blobs), blobs


def test_offline_mode_is_unchanged_and_asks_the_hub_nothing(tmp_path, monkeypatch):
    from huggingface_hub import constants

    with hub() as server:
        for cfg in (hub_cfg(server, tmp_path / "hf", download=False),
                    EmbedConfig(model="ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=str(tmp_path / "hf"),
                                hub_endpoint=server.endpoint, download=False)):
            with pytest.raises(WeightsNotFoundError) as err:
                check_weights(cfg)
            assert "\n" not in str(err.value) and not isinstance(err.value, WeightsDownloadError)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1: auto means off
        with pytest.raises(WeightsNotFoundError, match="not in the Hugging Face cache"):
            check_weights(hub_cfg(server, tmp_path / "hf", download="auto"))
        with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
            check_weights(hub_cfg(server, tmp_path / "hf", download=True))
        assert server.requests == []
    assert not (tmp_path / "hf").exists() or not list((tmp_path / "hf").rglob("*.safetensors"))


def test_every_actor_on_every_node_loads_the_one_copy(shards_dir, local_cluster, tmp_path, monkeypatch):
    """Head (the driver) + two nodes with one (fake) GPU each: two embed actors, one per node. The
    driver's Hugging Face cache is its own (the nodes' caches lack the model), so each node gets the
    driver's copy through the object store: one GET per file for the whole cluster."""
    from huggingface_hub import constants

    from pipelines.cli import run
    from pipelines.cli.config import validate_config
    from pipelines.weights_shipment import NODE_CACHE

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "driver-hf"))  # this process only
    cluster, nodes = local_cluster({"num_cpus": 1}, [{"num_cpus": 1, "num_gpus": 1}, {"num_cpus": 1, "num_gpus": 1}])
    node_ids = [n.node_id for n in nodes]
    copies = [pathlib.Path(tempfile.gettempdir(), NODE_CACHE, i[:16]) for i in node_ids]
    try:
        with hub() as server:
            cfg = small_config(shards_dir["dir"], tmp_path / "out", **{
                "embed.pretrained": f"hf-hub:{REPO_ID}", "embed.allow_random_init": False, "embed.concurrency": 2,
                "embed.download": True, "embed.hub_endpoint": server.endpoint})
            manifest = run(validate_config(cfg))
            assert [len(server.gets(name)) for name in FILES] == [1, 1], server.requests
        embed = manifest["stages"]["embed"]
        assert embed["actor_resources"] == {"num_gpus": 1, "num_cpus": 1.0, "actors": 2}
        assert sum(embed["actors_ran"].values()) == 2 and all(k.startswith("cpu/") for k in embed["actors_ran"])
        assert manifest["model_id"] == model_id_for(EmbedConfig(pretrained=str(SHIPPED)))
        for copy in copies:  # each node laid the driver's copy out once, byte for byte
            for name, content in FILES.items():
                (path,) = copy.glob(f"*/models--*/snapshots/*/{name}")
                assert path.read_bytes() == content
            assert not list(copy.rglob("*.tmp"))
        table = pq.read_table(next((tmp_path / "out" / schema.EMBEDDINGS_DIR).glob("*.parquet")))
        assert table.num_rows > 0 and np.abs(np.stack(table[schema.EMBEDDING].to_numpy(zero_copy_only=False))).sum() > 0
    finally:
        ray.shutdown()
        for copy in copies:
            shutil.rmtree(copy, ignore_errors=True)


def test_no_shipment_without_cache_files_a_shared_cache_or_beside_the_drivers_own_ray(tmp_path):
    from pipelines.weights_shipment import ship
    from prune.embed.hub import Fetched

    files = [Fetched(str(SHIPPED / WEIGHTS), REPO, 1, "")]
    assert ship([], EmbedConfig()) is None
    assert ship(files, EmbedConfig(shared_cache=True)) is None
    assert ship(files, EmbedConfig(), ray_here=True) is None  # a Ray this driver started: one disk


def test_a_cache_behind_a_symlink_gives_the_same_layout_to_ship(tmp_path):
    """hf_hub_download resolves symlinks in the paths it returns; the path shipped to the nodes is the
    one inside the cache, wherever its root is."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with hub() as server:
        fetched = check_weights(hub_cfg(server, tmp_path / "link"))
    assert [f.relative.split(os.sep)[0] for f in fetched] == ["models--ssl-prune--fmnist-clip"] * 2
    assert [f.relative.split(os.sep)[1] for f in fetched] == ["snapshots"] * 2
    located = locate([HubFile(REPO_ID, (CONFIG,)), HubFile(REPO_ID, (WEIGHTS,))], str(tmp_path / "link"))
    assert [f.relative for f in located] == [f.relative for f in fetched]



def test_a_node_holding_another_commit_loads_the_shipped_files_not_its_own(ray_cluster, tmp_path):
    """A node whose own cache (a baked image) has the repo at another commit must not load it: the
    embeddings would mix weights under one model id. The same commit and sizes: its own copy serves."""
    from pipelines.weights_shipment import NODE_CACHE, ship, weights_here
    from prune.embed.backends.open_clip_backend import OpenClipEmbedder

    with hub() as server:
        cfg = hub_cfg(server, tmp_path / "driver")
        shipment = ship(check_weights(cfg), cfg)
    repo = "models--ssl-prune--fmnist-clip"
    shutil.copytree(tmp_path / "driver" / repo, tmp_path / "older" / repo, symlinks=False)
    (commit,) = os.listdir(tmp_path / "older" / repo / "snapshots")
    other = "f" * 40
    os.rename(tmp_path / "older" / repo / "snapshots" / commit, tmp_path / "older" / repo / "snapshots" / other)
    (tmp_path / "older" / repo / "refs" / "main").write_text(other)

    @ray.remote(num_cpus=0)
    def cache_dir_of(cfg, shipment):
        return weights_here(OpenClipEmbedder, cfg, shipment).cache_dir

    same = ray.get(cache_dir_of.remote(cfg, shipment))
    elsewhere = ray.get(cache_dir_of.remote(cfg.model_copy(update={"cache_dir": str(tmp_path / "older")}), shipment))
    try:
        assert same == str(tmp_path / "driver")
        assert NODE_CACHE in elsewhere and elsewhere != str(tmp_path / "older")
        (path,) = pathlib.Path(elsewhere).glob(f"{repo}/snapshots/{commit}/{WEIGHTS}")
        assert path.read_bytes() == FILES[WEIGHTS]
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)
