"""benchmarks/gpu_check.sh without a usable GPU: one line, exit 0 (or 2 where a GPU is there but torch
cannot use it), and no results file. The GPU is hidden the ways the script looks for one, so these
hold on a GPU machine too (except the last two, which need torch to see no CUDA device)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from .conftest import REPO

BASH = shutil.which("bash") or "/bin/bash"
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.sh")


def check(tmp_path, env: dict, timeout: float = 60) -> tuple[subprocess.CompletedProcess, str]:
    results = tmp_path / "results" / "gpu_check.txt"
    proc = subprocess.run([BASH, SCRIPT, str(results)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert not results.exists() and not (tmp_path / "results").exists()
    return proc, proc.stdout + proc.stderr


def test_no_nvidia_smi_skips_in_one_line(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    proc, out = check(tmp_path, {"PATH": str(empty)})  # not even coreutils: only bash's builtins run
    assert proc.returncode == 0, out
    assert out.splitlines() == ["gpu_check: skipped, no NVIDIA GPU (nvidia-smi not found)"]


def test_an_empty_cuda_visible_devices_skips_in_one_line(tmp_path):
    proc, out = check(tmp_path, os.environ | {"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, out
    assert out.splitlines() == ["gpu_check: skipped, no GPU visible (CUDA_VISIBLE_DEVICES is empty)"]


def test_gpu_check_skip_skips_in_one_line(tmp_path):
    proc, out = check(tmp_path, os.environ | {"GPU_CHECK_SKIP": "1"})
    assert proc.returncode == 0, out
    assert out.splitlines() == ["gpu_check: skipped, GPU_CHECK_SKIP is set"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a GPU here")
def test_a_gpu_torch_cannot_use_fails_in_one_line(tmp_path):
    """nvidia-smi lists a GPU (a fake one here) but torch sees none (an old driver, a CPU build): exit 2."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text('#!/bin/sh\necho "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"\n')
    (fake / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env |= {"PATH": f"{fake}{os.pathsep}{env.get('PATH', '')}", "PYTHON": sys.executable}
    proc, out = check(tmp_path, env)
    assert proc.returncode == 2, out
    (line,) = out.splitlines()
    assert line.startswith("gpu_check: error, there is a GPU (GPU 0: NVIDIA H100") and "is_available() is False" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a GPU here")
def test_the_throughput_benchmark_skips_in_one_line_without_cuda(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_throughput.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert len((proc.stdout + proc.stderr).splitlines()) == 1
    assert proc.stdout.startswith("gpu_throughput: skipped, no CUDA device")
