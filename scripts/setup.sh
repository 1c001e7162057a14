#!/usr/bin/env bash
# Everything ssl-prune needs on a fresh machine: Fashion-MNIST (Debian), a .venv with
# torch/torchvision pinned to the builds this machine carries, then the package itself.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: Fashion-MNIST (real images for the demo, tests, benchmarks) and headless
# Chromium (the report test renders report.html in it, as a person would look at it)
NEED=""
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || NEED="$NEED dataset-fashion-mnist"
command -v chromium >/dev/null || NEED="$NEED chromium"
if [ -n "$NEED" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $NEED
fi

PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# open_clip needs torchvision; these two builds import together (see README, "Set-up and the two commands")
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
.venv/bin/python -m pip install -q -e ".[test]"
