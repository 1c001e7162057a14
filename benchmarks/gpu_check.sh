#!/usr/bin/env bash
# The GPU check, in under 5 minutes on a machine with an NVIDIA GPU: the tests that need one
# (tests/test_gpu.py, `pytest -m gpu`: embed actors on the GPU, bf16, fp32/bf16 agreement, one actor
# per GPU), then the embed throughput end to end and per part (benchmarks/gpu_throughput.py, ViT-B-32
# random-init on synthetic web photos), both written to one results file. Nothing is downloaded.
# Without a GPU it prints one line and exits 0.
#
#   bash benchmarks/gpu_check.sh [RESULTS_FILE]        (default: benchmarks/results/gpu_check.txt)
#
# Environment: PYTHON (default .venv/bin/python, else python3); GPU_CHECK_IMAGES (40000 photos);
# GPU_CHECK_BUDGET_S (285: the whole check's limit, tests get at most GPU_CHECK_TEST_S, 150);
# GPU_CHECK_SKIP=1 skips as if there were no GPU; CUDA_VISIBLE_DEVICES="" skips too; GPU_CHECK_ARGS:
# more arguments for gpu_throughput.py; GPU_CHECK_DEVICE=cpu: a dry run of this script on a machine
# without a GPU (the GPU tests skip, the benchmark runs on CPU; pass a small GPU_CHECK_IMAGES);
# GPU_CHECK_LOGS=DIR keeps the full pytest output and the benchmark's log there too.
# Exit status: 0 the tests passed and the benchmark ran (or skipped: no GPU); 1 a test failed or the
# benchmark did not finish; 2 there is a GPU but this Python cannot use it (says why, in one line).
set -u

# Before the GPU is found only shell builtins run: the skip works with any PATH.
skip() { echo "gpu_check: skipped, $*"; exit 0; }
device=${GPU_CHECK_DEVICE:-cuda}
if [ "$device" = cpu ]; then
  gpu_list="no GPU: a dry run on CPU (GPU_CHECK_DEVICE=cpu)"
else
  [ -n "${GPU_CHECK_SKIP:-}" ] && skip "GPU_CHECK_SKIP is set"
  if [ "${CUDA_VISIBLE_DEVICES+set}" = set ] && { [ -z "$CUDA_VISIBLE_DEVICES" ] || [ "$CUDA_VISIBLE_DEVICES" = "-1" ]; }; then
    skip "no GPU visible (CUDA_VISIBLE_DEVICES is empty)"
  fi
  command -v nvidia-smi >/dev/null 2>&1 || skip "no NVIDIA GPU (nvidia-smi not found)"
  gpu_list=$(nvidia-smi -L 2>/dev/null) || gpu_list=""
  [ -n "$gpu_list" ] || skip "no NVIDIA GPU (nvidia-smi lists none)"
fi

here=${BASH_SOURCE[0]%/*}
[ "$here" = "${BASH_SOURCE[0]}" ] && here=.
results=${1:-$here/results/gpu_check.txt}  # a relative path is the caller's
case "$results" in /*) ;; *) results="$PWD/$results" ;; esac
cd "$here/.." || exit 2
images=${GPU_CHECK_IMAGES:-40000}
budget=${GPU_CHECK_BUDGET_S:-285}
test_limit=${GPU_CHECK_TEST_S:-150}

if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
elif [ -x .venv/bin/python ] && .venv/bin/python -c "" 2>/dev/null; then
  py=.venv/bin/python
else
  py=python3
fi
# a GPU is there: this Python must be able to use it, or the check fails (exit 2), in one line
env_line=$(GPU_CHECK_DEVICE=$device "$py" - <<'EOF' 2>&1
import os, sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        import open_clip, pytest, ray, torch, torchvision  # noqa: F401
    except Exception as exc:
        print(f"{sys.executable} cannot import what the check needs ({type(exc).__name__}: {exc})")
        sys.exit(1)
    usable = torch.cuda.is_available()
if not usable and os.environ["GPU_CHECK_DEVICE"] != "cpu":
    why = "; ".join(str(w.message).splitlines()[0] for w in caught)
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use it: torch.cuda.is_available() is False"
          + (f" ({why})" if why else ""))
    sys.exit(1)
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), torchvision {torchvision.__version__}, "
      f"ray {ray.__version__}, Python {sys.version.split()[0]}; torch sees {torch.cuda.device_count()} GPU(s)")
EOF
)
if [ $? -ne 0 ]; then
  echo "gpu_check: error, there is a GPU (${gpu_list%%$'\n'*}) but $(echo "$env_line" | tail -n 1)" >&2
  exit 2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
start=$SECONDS
echo "gpu_check: ${gpu_list%%$'\n'*}; $env_line"
echo "gpu_check: tests (pytest -m gpu tests/test_gpu.py, at most ${test_limit} s) ..."
timeout -k 10 "$test_limit" "$py" -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/test_gpu.py \
  > "$work/tests.txt" 2>&1
test_rc=$?
test_s=$((SECONDS - start))
echo "gpu_check: tests exit $test_rc in ${test_s} s: $(tail -n 1 "$work/tests.txt")"

left=$((budget - (SECONDS - start)))
bench_rc=124
if [ "$left" -gt 60 ]; then
  echo "gpu_check: throughput (benchmarks/gpu_throughput.py, ${images} photos, at most ${left} s) ..."
  # shellcheck disable=SC2086  # GPU_CHECK_ARGS: several arguments
  timeout -k 10 "$left" "$py" benchmarks/gpu_throughput.py --device "$device" --images "$images" \
    --out "$work/throughput.md" ${GPU_CHECK_ARGS:-} > "$work/throughput.log" 2>&1
  bench_rc=$?
fi
bench_s=$((SECONDS - start - test_s))

{
  echo "# GPU check: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  if [ "$device" = cpu ]; then
    gpu_line="none, a dry run on CPU"
  else
    gpu_line="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1) (driver version last)"
  fi
  echo "GPU: $gpu_line; $(nproc) cores, $(free -g 2>/dev/null | awk '/^Mem:/ {print $2 " GB memory"}')"
  echo "$env_line"
  echo "Command: bash benchmarks/gpu_check.sh (images ${images}${GPU_CHECK_ARGS:+, $GPU_CHECK_ARGS}); ${test_s} s of tests, ${bench_s} s of throughput, $((SECONDS - start)) s in all"
  echo
  echo "## Tests: pytest -m gpu tests/test_gpu.py (exit $test_rc$([ $test_rc -eq 124 ] && echo ": timed out after ${test_limit} s"))"
  echo
  echo '```'
  if [ "$test_rc" -eq 0 ]; then tail -n 15 "$work/tests.txt"; else tail -n 80 "$work/tests.txt"; fi
  echo '```'
  echo
  if [ "$bench_rc" -eq 0 ] && [ -s "$work/throughput.md" ]; then
    sed 's/^## /### /; s/^# gpu_throughput:/## Throughput: benchmarks\/gpu_throughput.py,/' "$work/throughput.md"
  else
    echo "## Throughput: benchmarks/gpu_throughput.py did not finish (exit $bench_rc$([ "$left" -le 60 ] && echo ", no time left after the tests"))"
    echo
    echo '```'
    [ -f "$work/throughput.log" ] && tail -n 60 "$work/throughput.log"
    echo '```'
  fi
} > "$work/results.txt"
mkdir -p "$(dirname "$results")"
cp "$work/results.txt" "$results.tmp" && mv "$results.tmp" "$results"
if [ -n "${GPU_CHECK_LOGS:-}" ]; then
  mkdir -p "$GPU_CHECK_LOGS" && cp "$work/tests.txt" "$GPU_CHECK_LOGS/gpu_check_tests.txt"
  [ -f "$work/throughput.log" ] && cp "$work/throughput.log" "$GPU_CHECK_LOGS/gpu_check_throughput.log"
fi

if [ "$bench_rc" -eq 0 ]; then
  grep -E '^\| \*\*img/s end to end|^- (limiting part|target)' "$work/throughput.md" | sed 's/^/gpu_check: /'
fi
echo "gpu_check: results in $results"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
