#!/usr/bin/env bash
# Everything ssl-prune needs on a fresh machine: Fashion-MNIST (Debian), a .venv with
# torch/torchvision pinned to the builds this machine carries, then the package itself.
# One line per step; apt's and pip's own output goes to the log named below (--verbose, or
# SETUP_VERBOSE=1, shows it as well). A failing step prints its last lines and the log's path.
set -euo pipefail
cd "$(dirname "$0")/.."

VERBOSE="${SETUP_VERBOSE:-0}"
for arg in "$@"; do
  case "$arg" in
    --verbose|-v) VERBOSE=1 ;;
    *) echo "setup.sh: unknown argument '$arg' (only --verbose)" >&2; exit 2 ;;
  esac
done
LOG="${SETUP_LOG:-$PWD/.setup.log}"
: > "$LOG"

step() {  # step "what it does" command...: one line, the output in $LOG, its tail on failure
  local what="$1"; shift
  local start=$SECONDS rc=0
  printf 'setup: %s ... ' "$what"
  echo "=== $what: $*" >> "$LOG"
  if [ "$VERBOSE" = 1 ]; then
    echo
    "$@" 2>&1 | tee -a "$LOG" || rc=${PIPESTATUS[0]}
  else
    "$@" >> "$LOG" 2>&1 || rc=$?
  fi
  if [ "$rc" -ne 0 ]; then
    echo "FAILED (exit $rc)"
    echo "setup: the last lines of $LOG:" >&2
    tail -n 30 "$LOG" >&2
    exit "$rc"
  fi
  echo "done ($((SECONDS - start)) s)"
}

# Debian packages: Fashion-MNIST (real images for the demo, tests, benchmarks) and headless
# Chromium (the report test renders report.html in it, as a person would look at it)
NEED=""
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || NEED="$NEED dataset-fashion-mnist"
command -v chromium >/dev/null || NEED="$NEED chromium"
if [ -n "$NEED" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  step "apt-get update" $SUDO apt-get update
  step "apt-get install$NEED" $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y $NEED
else
  echo "setup: Debian packages (dataset-fashion-mnist, chromium) ... already installed"
fi

PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ]; then
  echo "setup: virtualenv .venv ... already there"
else
  step "virtualenv .venv" "$PY" -m venv .venv
fi
step "pip itself" .venv/bin/python -m pip install --upgrade pip
# open_clip needs torchvision; these two builds import together (see docs/getting-started.md, "Set-up")
step "torch ${TORCH_VERSION:-2.14.1}, torchvision ${TORCHVISION_VERSION:-0.29.1}" \
  .venv/bin/python -m pip install "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
step "ssl-prune and its dependencies (pip install -e .[test])" .venv/bin/python -m pip install -e ".[test]"
echo "setup: ready (the full output of each step: $LOG)"
