#!/usr/bin/env bash
# The demo end to end: install, make Fashion-MNIST shards, prune them with the shipped encoder,
# show the result and how well the prototypes found the (never seen) classes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
rm -rf demo/shards demo/out
.venv/bin/ssl-prune demo-data demo/shards --count 4000 --shard-size 500
.venv/bin/ssl-prune run configs/demo.yaml "$@"
.venv/bin/python - <<'PY'
import collections, glob, json
import pyarrow.parquet as pq
from prune import schema
m = json.load(open(f"demo/out/{schema.MANIFEST}"))
print(json.dumps({"counts": m["counts"], "timings_s": m["timings_s"], "model_id": m["model_id"]}, indent=2))
print("bands (a prefix of pruned/ is a smaller selection):")
for b in m["bands"]:
    print(f"  keep {b['keep_fraction']:.2f}: {b['prefix']} ({b['cumulative_samples']} samples)")
# labels ride along in the demo shards' parquet; the pipeline never read them
labels = {}
for f in glob.glob("demo/shards/*.parquet"):
    t = pq.read_table(f, columns=[schema.KEY, "label_name"]).to_pydict()
    labels.update(zip(t[schema.KEY], t["label_name"]))
by_cluster = collections.defaultdict(collections.Counter)
for f in glob.glob(f"demo/out/{schema.SCORES_DIR}/*.parquet"):
    t = pq.read_table(f, columns=[schema.KEY, schema.CLUSTER, schema.STATUS]).to_pydict()
    for key, cluster, status in zip(t[schema.KEY], t[schema.CLUSTER], t[schema.STATUS]):
        if status == schema.STATUS_OK:
            by_cluster[cluster][labels[key]] += 1
total = sum(sum(c.values()) for c in by_cluster.values())
purity = sum(c.most_common(1)[0][1] for c in by_cluster.values()) / total
print(f"prototypes vs the hidden Fashion-MNIST labels: purity {purity:.1%} over {len(by_cluster)} clusters")
for cluster, c in sorted(by_cluster.items()):
    name, n = c.most_common(1)[0]
    print(f"  cluster {cluster}: {sum(c.values()):4d} samples, {n / sum(c.values()):.0%} {name}")
PY
echo "the run, to look at: demo/out/report.html (counts, distances, clusters with their images, bands, timings)"
