#!/usr/bin/env bash
# The demo end to end: install, make Fashion-MNIST shards, prune them, show the result.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
rm -rf demo
.venv/bin/ssl-prune demo-data demo/shards --count 4000 --shard-size 500
.venv/bin/ssl-prune run configs/demo.yaml "$@"
.venv/bin/python - <<'PY'
import json
m = json.load(open("demo/out/manifest.json"))
print(json.dumps({"counts": m["counts"], "timings_s": m["timings_s"], "model_id": m["model_id"]}, indent=2))
print("bands (a prefix of pruned/ is a smaller selection):")
for b in m["bands"]:
    print(f"  keep {b['keep_fraction']:.2f}: {b['prefix']} ({b['cumulative_samples']} samples)")
PY
