"""`ssl-prune run` submitted as a Ray Job to a real `ray start --head`, as docs/cluster.md says to.

The head is this test's own: started from the venv's `ray` with a private `--temp-dir` (its
address file and sessions live there, so no other `ray.init()` on the machine finds it) and every
port chosen free, in its own process group; it is stopped by signalling that group and then any
process left that names its temp dir or its GCS address. `ray stop` is never used: it stops every
Ray on the machine, the test session's and other users' included. The session's Ray is not
touched; the job runs on the head alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
import uuid

import pytest
import yaml

from .conftest import REPO, free_ports, small_config, subprocess_env

VENV_BIN = os.path.join(REPO, ".venv", "bin")
RAY = os.path.join(VENV_BIN, "ray")
# the working dir is uploaded to the cluster: leave out what the job does not need (there is a
# size limit); .gitignore'd paths are left out by Ray already, these are named to be sure
EXCLUDES = [".git", ".venv", "demo", "benchmarks/results", "**/__pycache__", "*.egg-info", ".pytest_cache", "models/*/ray_train"]
JOB_TIMEOUT_S = 420


# Ray's token authentication (on by default for `ray start`): the head and the `ray job` CLI
# share this test's own token, so neither depends on (nor writes) ~/.ray/auth_token
TOKEN = uuid.uuid4().hex + uuid.uuid4().hex


def _env() -> dict:
    """This environment as an activated venv would have it, without any Ray address."""
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("RAY_AUTH_")}
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    # SIGTERM ends a `ray start --block` head at once instead of draining it first (up to 30 s)
    return env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


def _cli(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _pids_naming(*needles: str) -> list[int]:
    """Processes whose command line names any of `needles` (a head's temp dir, its GCS address) as
    a whole: not followed by more of a name or a number (127.0.0.1:6379 is not 127.0.0.1:63790)."""
    pattern = re.compile("|".join(rf"(?<![\w.]){re.escape(n)}(?![\w.-])" for n in needles))
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")  # arguments separated by NUL
        except OSError:
            continue
        if pattern.search(cmdline):
            pids.append(int(entry))
    return pids


class Head:
    """A `ray start --head --block` of our own; `stop()` ends exactly its processes."""

    def __init__(self, num_cpus: int = 2):
        self.temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: socket paths live under it
        (gcs, dash, agent_http, agent_grpc, metrics, env_agent, client, node_mgr, obj_mgr) = free_ports(9)
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.dashboard = f"http://127.0.0.1:{dash}"
        self.log = open(os.path.join(self.temp_dir, "ray_start.log"), "w")
        self.proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             f"--num-cpus={num_cpus}", "--num-gpus=0", f"--object-store-memory={200 * 2**20}",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
             f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={env_agent}",
             f"--ray-client-server-port={client}", f"--node-manager-port={node_mgr}",
             f"--object-manager-port={obj_mgr}", f"--temp-dir={self.temp_dir}", "--disable-usage-stats"],
            env=_env(), cwd=self.temp_dir, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_for_job_server(self, timeout_s: float = 120) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.startup_log()}")
            try:
                req = urllib.request.Request(f"{self.dashboard}/api/jobs/", headers={"Authorization": f"Bearer {TOKEN}"})
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"no job server at {self.dashboard} after {timeout_s}s:\n{self.startup_log()}")

    def startup_log(self) -> str:
        self.log.flush()
        return open(self.log.name).read()[-5000:]

    def stop(self) -> list[int]:
        """SIGTERM to `ray start --block` (it drains and ends the processes it started), then
        SIGKILL to its process group and to anything left that names this head; returns those."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # our session: `start_new_session=True`
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        leftovers = []
        for _ in range(10):
            pids = _pids_naming(self.temp_dir, self.gcs_address)
            if not pids:
                break
            leftovers += pids
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return leftovers


@pytest.fixture
def ray_head():
    head = Head()
    try:
        head.wait_for_job_server()
        yield head
    finally:
        leftovers = head.stop()
        print(f"head stopped; processes killed after its process group: {leftovers}")
        assert not _pids_naming(head.temp_dir, head.gcs_address), "processes of the test's head are still alive"


def test_run_submitted_as_a_ray_job(ray_head, shards_dir, tmp_path):
    out = tmp_path / "out"
    shards = f"{shards_dir['dir']}/{{00000..00001}}.tar"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(small_config(shards, out)))
    job_id = f"ssl-prune-test-{uuid.uuid4().hex[:8]}"

    try:  # blocking: tails the job's log, exits 1 if the job failed
        submit = _cli(
            "job", "submit", "--address", ray_head.dashboard, "--submission-id", job_id, "--working-dir", REPO,
            "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
            "--", "python", "-m", "pipelines.cli", "run", str(config), "select.keep_fraction=0.5",
            timeout=JOB_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        logs = _cli("job", "logs", "--address", ray_head.dashboard, job_id)
        _cli("job", "stop", "--address", ray_head.dashboard, job_id)
        pytest.fail(f"job {job_id} still running after {exc.timeout}s; its log:\n{logs.stdout[-8000:]}")
    status = _cli("job", "status", "--address", ray_head.dashboard, job_id)
    logs = _cli("job", "logs", "--address", ray_head.dashboard, job_id)
    print(f"--- ray job submit (exit {submit.returncode}):\n{submit.stdout[:1500]}\n...\n{submit.stderr[-3000:]}")
    print(f"--- ray job status:\n{status.stdout}{status.stderr}")
    print(f"--- ray job logs:\n{logs.stdout[-8000:]}")
    assert submit.returncode == 0, f"job failed:\n{logs.stdout[-6000:]}\n{submit.stderr[-3000:]}"
    assert "succeeded" in status.stdout.lower()

    manifest = json.loads((out / "manifest.json").read_text())
    c = manifest["counts"]
    port = ray_head.gcs_address.rsplit(":", 1)[1]
    assert manifest["ray"].startswith("address:") and manifest["ray"].endswith(f":{port}")  # via RAY_ADDRESS
    assert c["input_samples"] == 2 * 60 == c["kept"] + c["pruned"] + c["failed"] and c["failed"] == 0
    assert abs(c["kept"] - 60) <= 2 and c["input_shards"] == 2  # balanced over k=4: each rounds by 1/2
    assert f"120 samples in 2 shards -> kept {c['kept']}" in logs.stdout  # the CLI's summary, in the job log
    sizes = json.loads((out / "pruned" / "sizes.json").read_text())
    assert sum(sizes.values()) == c["kept"]
    assert manifest["stages"]["embed"]["actor_resources"]["num_gpus"] == 0
