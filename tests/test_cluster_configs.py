"""cluster/: the launcher YAML against Ray's own schema, the KubeRay manifests, the Dockerfile.

What is checked is what would make a cluster fail to start or a job fail at submission: a config
Ray's launcher rejects, GPU workers that advertise no GPU, an image that differs between pods or
runs another Ray, an entrypoint whose config or overrides the CLI would refuse.
"""

import copy
import json
import os
import re
import shlex
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml

from pipelines.cli.config import load_config
from prune.plan import capacity

from .conftest import REPO

CLUSTER = Path(REPO, "cluster")


def _load(path):
    with open(path) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def aws():
    return _load(CLUSTER / "aws.yaml")


@pytest.fixture(scope="module")
def raycluster():
    return _load(CLUSTER / "kuberay" / "raycluster.yaml")


@pytest.fixture(scope="module")
def rayjob():
    return _load(CLUSTER / "kuberay" / "rayjob.yaml")


@pytest.fixture(scope="module")
def dockerfile():
    return (CLUSTER / "Dockerfile").read_text()


def _project_version() -> str:
    import tomllib

    return tomllib.loads(Path(REPO, "pyproject.toml").read_text())["project"]["version"]


def _image_home(dockerfile: str) -> str:
    return re.search(r"^ENV SSL_PRUNE_HOME=(\S+)", dockerfile, re.M).group(1)


def _laion():
    return load_config(os.path.join(REPO, "configs", "laion.yaml"), ["input=x", "output=y"])


# ------------------------------------------------------------------ the cluster launcher (AWS)


def test_aws_yaml_validates_against_the_schema_shipped_in_ray(aws):
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(aws, json.loads(schema_path.read_text()))


def test_aws_yaml_passes_the_launchers_own_preparation_and_checks(aws):
    """What `ray up` does before touching AWS: merge the provider defaults, validate again."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(aws))
    validate_config(prepared)
    assert prepared["head_setup_commands"] == [] and prepared["worker_setup_commands"] == []  # the image has it all


def _node_groups(aws):
    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]
    workers = {name: t for name, t in types.items() if name != aws["head_node_type"]}
    gpu = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) > 0}
    cpu = {n: t for n, t in workers.items() if n not in gpu}
    return head, gpu, cpu


def test_aws_node_groups_gpu_embed_cpu_decode_head_runs_no_tasks(aws):
    head, gpu, cpu = _node_groups(aws)
    assert head["resources"].get("CPU") == 0 and "GPU" not in head["resources"]
    assert len(gpu) == 1 and len(cpu) == 1
    (g,), (c,) = gpu.values(), cpu.values()
    assert g["resources"]["GPU"] >= 1 and g["node_config"]["InstanceType"].startswith(("g5", "g6", "p4", "p5"))
    assert "GPU" not in c["resources"] and c["resources"]["CPU"] > 0
    for t in (g, c):  # autoscaling: from min up to max
        assert 0 <= t["min_workers"] < t["max_workers"]
    assert sum(t["max_workers"] for t in (g, c)) <= aws["max_workers"]
    for t in aws["available_node_types"].values():  # S3 access through an instance profile, not keys
        assert t["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")


def test_aws_cluster_holds_what_configs_laion_asks_for(aws):
    cfg = _laion()
    _, gpu, cpu = _node_groups(aws)
    (g,), (c,) = gpu.values(), cpu.values()
    assert g["max_workers"] * g["resources"]["GPU"] >= cfg.embed.concurrency  # one embed actor per GPU
    assert g["resources"]["CPU"] >= cfg.embed.num_cpus_per_actor + cfg.decode.num_cpus  # room to decode beside it
    if cfg.kmeans.fit_num_cpus:  # the fit is one task: it must fit on one node
        assert cfg.kmeans.fit_num_cpus <= max(c["resources"]["CPU"], g["resources"]["CPU"])


def test_aws_image_and_mounts(aws, dockerfile):
    image = aws["docker"]["image"]
    assert image.rsplit("/", 1)[-1] == f"ssl-prune:{_project_version()}"
    for remote, local in aws["file_mounts"].items():
        assert Path(REPO, local).exists(), local
        assert remote.startswith(_image_home(dockerfile))
    weights_mount = [o for o in aws["docker"]["run_options"] if o.startswith("-v ")]
    # writable: on the head, the driver fetches what the synced cache lacks into it
    assert any(o.endswith(f":{_hf_home(dockerfile)}") for o in weights_mount), weights_mount


def test_capacity_plan_default_cluster_is_aws_yaml_at_max_size(aws):
    head, gpu, cpu = _node_groups(aws)
    (g,), (c,) = gpu.values(), cpu.values()
    d = capacity.Cluster()
    assert (d.num_gpus, d.gpu_node_cpus) == (g["max_workers"] * g["resources"]["GPU"], g["resources"]["CPU"])
    assert (d.cpu_nodes, d.cpu_node_cpus) == (c["max_workers"], c["resources"]["CPU"])
    assert d.gpu == "A10G" and g["node_config"]["InstanceType"].startswith("g5")
    assert d.embed_actor_cpus == _laion().embed.num_cpus_per_actor


# ------------------------------------------------------------------ KubeRay


def _pod_templates(cluster_spec):
    yield "head", cluster_spec["headGroupSpec"]["template"]
    for g in cluster_spec["workerGroupSpecs"]:
        yield g["groupName"], g["template"]


def _limits(template):
    (container,) = template["spec"]["containers"]
    return container["resources"]["limits"], container["resources"].get("requests", {})


def _images(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "image" and isinstance(v, str):
                yield v
            else:
                yield from _images(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _images(v)


def test_raycluster_kind_version_and_groups(raycluster):
    assert raycluster["apiVersion"] == "ray.io/v1" and raycluster["kind"] == "RayCluster"
    spec = raycluster["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = [g for g in groups.values() if "nvidia.com/gpu" in _limits(g["template"])[0]]
    cpu = [g for g in groups.values() if g not in gpu]
    assert len(gpu) == 1 and len(cpu) == 1
    limits, requests = _limits(gpu[0]["template"])
    assert int(limits["nvidia.com/gpu"]) >= 1 and requests.get("nvidia.com/gpu") == limits["nvidia.com/gpu"]
    assert "nvidia.com/gpu" not in _limits(spec["headGroupSpec"]["template"])[0]
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["minReplicas"] < g["maxReplicas"]


def test_rayjob_runs_the_raycluster_spec_and_shuts_down(raycluster, rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["rayClusterSpec"] == raycluster["spec"]
    assert spec["shutdownAfterJobFinishes"] is True


def test_every_pod_runs_one_image_of_this_version(raycluster, rayjob):
    images = set(_images(raycluster)) | set(_images(rayjob))
    assert len(images) == 1, images
    (image,) = images
    assert image.rsplit("/", 1)[-1] == f"ssl-prune:{_project_version()}"
    n_templates = len(list(_pod_templates(raycluster["spec"])))
    assert len(list(_images(raycluster))) == n_templates  # one container per pod, each with the image


def test_weights_volume_is_mounted_where_the_image_looks(raycluster, rayjob, dockerfile):
    """One cache every pod mounts: the head (the driver) writes what it fetches, the workers read it."""
    hf_home = _hf_home(dockerfile)
    for name, template in _pod_templates(raycluster["spec"]):
        (container,) = template["spec"]["containers"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert hf_home in mounts and mounts[hf_home]["readOnly"] is (name != "head"), name
    _, overrides = _entrypoint(rayjob, dockerfile)
    assert "embed.shared_cache=true" in overrides  # so the workers load the driver's copy from it


def _entrypoint(rayjob, dockerfile):
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):  # leading VAR=value for the driver
        argv.pop(0)
    assert argv[:2] == ["ssl-prune", "run"], argv
    config, overrides = argv[2], argv[3:]
    home = _image_home(dockerfile)
    assert config.startswith(home + "/"), f"{config} is not in the image's {home}"
    return Path(REPO, os.path.relpath(config, home)), overrides


def test_rayjob_entrypoint_is_a_valid_run(rayjob, raycluster, dockerfile):
    config, overrides = _entrypoint(rayjob, dockerfile)
    assert config.is_file(), config
    cfg = load_config(str(config), overrides)  # the CLI's own loader: unknown keys or bad values fail here
    assert cfg.input.startswith("s3://") and cfg.output.startswith("s3://")
    assert any(o.startswith("input=") for o in overrides) and any(o.startswith("output=") for o in overrides)
    # the resources it asks for exist in the cluster it runs on
    groups = raycluster["spec"]["workerGroupSpecs"]
    gpu = next(g for g in groups if "nvidia.com/gpu" in _limits(g["template"])[0])
    assert gpu["maxReplicas"] * int(_limits(gpu["template"])[0]["nvidia.com/gpu"]) >= cfg.embed.concurrency
    if cfg.kmeans.fit_num_cpus:
        assert cfg.kmeans.fit_num_cpus <= max(float(_limits(g["template"])[0]["cpu"]) for g in groups)


def test_prereqs_define_what_the_pods_reference(raycluster):
    docs = list(yaml.safe_load_all((CLUSTER / "kuberay" / "prereqs.yaml").read_text()))
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for _, template in _pod_templates(raycluster["spec"]):
        assert ("ServiceAccount", template["spec"]["serviceAccountName"]) in kinds
        for v in template["spec"]["volumes"]:
            if "persistentVolumeClaim" in v:
                assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in kinds


# ------------------------------------------------------------------ the container build file


def _hf_home(dockerfile: str) -> str:
    m = re.search(r"^ENV HF_HOME=(\S+)", dockerfile, re.M)
    return m.group(1).replace("${SSL_PRUNE_HOME}", _image_home(dockerfile))


def _arg(dockerfile: str, name: str) -> str:
    return re.search(rf"^ARG {name}=(\S+)", dockerfile, re.M).group(1)


def test_dockerfile_base_is_rays_image_of_the_installed_version(dockerfile):
    base = _arg(dockerfile, "RAY_IMAGE")
    assert re.search(r"^FROM \$\{RAY_IMAGE\}", dockerfile, re.M)
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-gpu", base)
    assert m, base
    assert m.group(1) == ray.__version__
    assert (int(m.group(2)), int(m.group(3))) == sys.version_info[:2]  # the Python the tests run on


def test_dockerfile_installs_the_package_and_the_pinned_torch(dockerfile):
    setup = Path(REPO, "scripts", "setup.sh").read_text()
    for name, var in (("TORCH_VERSION", "TORCH_VERSION"), ("TORCHVISION_VERSION", "TORCHVISION_VERSION")):
        pinned = re.search(rf"\${{{var}:-([^}}]+)}}", setup).group(1)
        assert _arg(dockerfile, name) == pinned
    assert re.search(r"pip install [^\n]*--no-cache-dir \.(\s|$)", dockerfile)  # the package, not editable
    for src in ("pyproject.toml", "prune", "pipelines", "configs", "models"):
        assert re.search(rf"^COPY [^\n]*\b{re.escape(src)}\b", dockerfile, re.M), src
        assert Path(REPO, src).exists()
    # the driver may fetch weights the cache lacks (embed.download: auto); HF_HUB_OFFLINE would forbid it
    assert not re.search(r"^\s*(ENV\s+)?HF_HUB_OFFLINE=1", dockerfile, re.M)
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore
