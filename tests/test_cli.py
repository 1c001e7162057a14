"""The `ssl-prune` command as a user runs it: clear errors, and the demo end to end on CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from .conftest import REPO, subprocess_env

CLI = [sys.executable, "-m", "pipelines.cli"]


def _run(args, tmp_path, **env):
    full_env = subprocess_env(**{"HF_HOME": str(tmp_path / "hf"), "XDG_CACHE_HOME": str(tmp_path / "cache")} | env)
    return subprocess.run(CLI + args, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "override, named",
    [
        ("select.keep_fractoin=0.5", "unknown config key 'select.keep_fractoin'; did you mean 'select.keep_fraction'?"),
        ("kmeans.seeds=1", "unknown config key 'kmeans.seeds'; did you mean 'kmeans.seed'?"),
        ("select.keep_fraction=1.5", "bad value for 'select.keep_fraction'"),
        ("embed.batch_size=zero", "bad value for 'embed.batch_size'"),
        ("select.policy=hardest", "bad value for 'select.policy'"),
    ],
)
def test_bad_config_is_one_message_naming_the_key(tmp_path, override, named):
    res = _run(["run", "configs/demo.yaml", override, f"output={tmp_path / 'out'}"], tmp_path)
    assert res.returncode == 2
    assert res.stderr.startswith("ssl-prune: error: ")
    assert named in res.stderr and len(res.stderr.strip().splitlines()) == 1  # no library chatter around it
    assert not (tmp_path / "out").exists()  # validated before any work


@pytest.mark.parametrize("overrides, named", [
    (["embed.backend=open_clip", "embed.model=ViT-B-3", "embed.pretrained=null", "embed.allow_random_init=true"],
     "embed.model 'ViT-B-3' is not an architecture of embed.backend=open_clip; did you mean 'ViT-B-32'"),
    (["output=gs://some-bucket/out"], "cannot open gs://some-bucket/out: Please install gcsfs"),
    (["input=zz://bucket/shards"], "cannot open zz://bucket/shards: Protocol not known: zz"),
])
def test_user_errors_past_the_config_are_one_line_too(tmp_path, overrides, named):
    """Errors only the model registry or the storage layer can see: before Ray starts, one line, exit 2."""
    res = _run(["run", "demo", f"output={tmp_path / 'out'}", *overrides], tmp_path)
    assert res.returncode == 2 and named in res.stderr, res.stderr[-2000:]
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_an_unknown_key_far_from_every_known_one_gets_no_guess(tmp_path):
    res = _run(["run", "configs/demo.yaml", "zzz=1", f"output={tmp_path / 'out'}"], tmp_path)
    assert res.returncode == 2 and "unknown config key 'zzz'" in res.stderr and "did you mean" not in res.stderr


def test_version_is_the_installed_distributions(tmp_path):
    from importlib.metadata import version

    res = _run(["--version"], tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == f"ssl-prune {version('ssl-prune')}"


def test_missing_weights_name_the_tag_and_are_not_downloaded_offline(tmp_path):
    """With downloads off, today's one-line error; with them on (auto) and no hub in reach (this
    machine has no route to huggingface.co), the same error and why nothing was fetched."""
    args = ["run", "configs/demo.yaml", "embed.backend=open_clip", "embed.model=ViT-B-32", "embed.allow_random_init=false",
            "embed.pretrained=laion2b_s34b_b79k", f"output={tmp_path / 'out'}"]
    for extra, because in ((["embed.download=false"], None),
                           (["embed.download=auto", "embed.hub_endpoint=http://127.0.0.1:9"], "could not be reached")):
        res = _run(args + extra, tmp_path)
        assert res.returncode == 2, res.stderr
        assert "laion2b_s34b_b79k" in res.stderr and "not on this machine" in res.stderr
        assert "embed.pretrained" in res.stderr
        assert (because in res.stderr) if because else "embed.download=auto" not in res.stderr
        assert not (tmp_path / "out").exists()


def test_missing_checkpoint_file_is_named(tmp_path):
    missing = tmp_path / "nope.pt"
    res = _run(["run", "configs/demo.yaml", "embed.allow_random_init=false", f"embed.pretrained={missing}",
                f"output={tmp_path / 'out'}"], tmp_path)
    assert res.returncode == 2 and str(missing) in res.stderr


def _install_wheel(tmp_path) -> str:
    """Build ssl-prune's wheel from a copy of the checkout and install it, without dependencies, in a
    fresh virtualenv that sees this one's packages; -> that virtualenv's bin directory."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "prune", "pipelines", "configs", "models"):
        copy = shutil.copytree if os.path.isdir(os.path.join(REPO, name)) else shutil.copy
        copy(os.path.join(REPO, name), src / name, **({"ignore": shutil.ignore_patterns("__pycache__", "ray_train")}
                                                      if copy is shutil.copytree else {}))
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(pip + ["wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(src)],
                   check=True, capture_output=True, timeout=300)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    ours = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (tmp_path / "venv" / site.removeprefix(str(venv) + "/") / "_deps.pth").write_text(ours + "\n")  # torch, ray...
    wheel = next((tmp_path / "wheel").glob("ssl_prune-*.whl"))
    subprocess.run(pip + ["--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return str(venv / "bin")


def test_installed_demo_runs_from_any_directory_on_a_cpu_only_ray(tmp_path):
    """`pip install .`, then, in a directory that is not the checkout, the shipped config by name
    with the shipped encoder found inside the package."""
    bin_dir = _install_wheel(tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = subprocess_env(HF_HOME=str(tmp_path / "hf"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    env.pop("PYTHONPATH", None)  # the installed package, not the checkout

    def cli(*args):
        return subprocess.run([os.path.join(bin_dir, "ssl-prune"), *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=600)

    made = cli("demo-data", "shards", "--count", "300", "--shard-size", "100")
    assert made.returncode == 0, made.stderr
    # dedup.eps looser than the demo's 0.01, at which 300 images hold almost no near-copies: ~1/6 go
    run = ("run", "demo", "input=shards/{00000..00002}.tar", "output=out", "kmeans.k=5", "select.keep_fraction=0.5",
           "write.samples_per_shard=40", "ray.num_cpus=2", "embed.torch_threads=null", "dedup.eps=0.03")
    res = cli(*run)
    assert res.returncode == 0, res.stderr[-3000:]
    out = work / "out"
    ran = json.loads((out / "manifest.json").read_text())["config"]["embed"]["pretrained"]
    assert ran.startswith(os.path.join(tmp_path, "venv")) and ran.endswith("pipelines/shipped/models/fmnist-simclr")
    assert sorted(os.listdir(work)) == ["out", "shards"]  # nothing written beside the output
    assert "faiss.loader" not in res.stderr and "streaming_executor" not in res.stderr  # a quiet console
    assert "core_worker" not in res.stderr and "Token authentication" not in res.stderr  # Ray's noise too
    assert "stage embed: 3 shards computed, 0 reused in" in res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    c = manifest["counts"]
    assert c["removed"] > 0 and c["removed_by_reason"] == {"near_duplicate": c["removed"]}
    assert (f"300 samples in 3 shards -> kept {c['kept']}, pruned {c['pruned']}, "
            f"removed {c['removed']} {{\"near_duplicate\": {c['removed']}}}, failed 0 {{}}") in res.stdout
    assert c["input_samples"] == 300 == c["kept"] + c["pruned"] + c["removed"] + c["failed"]
    # keep_fraction is of what dedup left; each of the k=5 clusters rounds by at most 1/2
    assert abs(c["kept"] - (300 - c["removed"]) / 2) <= 5 / 2
    assert manifest["stages"]["embed"]["actor_resources"]["num_gpus"] == 0
    assert manifest["stages"]["embed"]["torch_threads"] == 2  # the actor gets the node's cores, not Ray's 1
    assert manifest["random_init"] is False and manifest["model_id"].startswith("local:small_resnet:")  # the shipped encoder
    assert json.loads((out / "pruned" / "sizes.json").read_text()) and (out / "pruned" / "bands.json").exists()
    assert {"ray", "torch", "faiss-cpu", "open_clip_torch"} <= manifest["versions"].keys()
    # the same run again: every stage complete, so nothing starts, not even Ray
    again = cli(*run)
    second = json.loads((out / "manifest.json").read_text())
    assert again.returncode == 0 and second["ray"] == "not started" and all(s["reused"] for s in second["stages"].values())
    assert second["counts"] == c and (out / "report.html").exists()
    assert "stage embed: 0 shards computed, 3 reused in" in again.stderr


def test_print_config_is_the_resolved_config_and_reads_back(tmp_path):
    res = _run(["run", "--print-config", "demo", "select.keep_fraction=0.4"], tmp_path)
    assert res.returncode == 0, res.stderr
    import yaml

    printed = yaml.safe_load(res.stdout)
    assert printed["select"]["keep_fraction"] == 0.4 and printed["stages"] and printed["dedup"]["eps"] > 0
    (tmp_path / "printed.yaml").write_text(res.stdout)
    again = _run(["run", str(tmp_path / "printed.yaml"), "--print-config"], tmp_path)
    assert again.returncode == 0 and yaml.safe_load(again.stdout) == printed  # a run of it is the same run


def test_a_verb_without_config_names_only_the_config(tmp_path):
    res = _run(["run"], tmp_path)
    assert res.returncode == 2 and "required: config" in res.stderr and "overrides" not in res.stderr.splitlines()[-1]
