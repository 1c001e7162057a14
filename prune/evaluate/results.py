"""`evaluate`'s results: results.csv, the mean ± std tables in Markdown, and the accuracy plot."""

from __future__ import annotations

import csv
import io
import math

import numpy as np

from prune.evaluate.layout import (
    _FLOAT_COLUMNS,
    _INT_COLUMNS,
    _OPTIONAL_FLOAT_COLUMNS,
    ACCURACY,
    BALANCED_ACCURACY,
    CAPTION,
    CLASSIFIER,
    CLIP,
    CLUSTERS_COVERED,
    COPIES_KEPT,
    JUNK_KEPT,
    KEEP_FRACTION,
    MISCAPTIONED_KEPT,
    N_TRAIN,
    POLICY,
    RECALL_1,
    RECALL_5,
    RESULT_COLUMNS,
    SEED,
    SHARED_FROM,
    WORST3_ACCURACY,
    fraction_label,
)


def results_csv(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in RESULT_COLUMNS})
    return buf.getvalue().encode()


def read_results_csv(data: bytes) -> list[dict]:
    """Rows of a results.csv, typed; a row that does not parse is dropped (it is simply re-run)."""
    rows = []
    for raw in csv.DictReader(io.StringIO(data.decode())):
        try:
            row = dict(raw)
            for c in _INT_COLUMNS:
                row[c] = int(row[c])
            for c in _FLOAT_COLUMNS:
                row[c] = float(row[c])
            for c in _OPTIONAL_FLOAT_COLUMNS:
                row[c] = float(row[c]) if row.get(c) not in (None, "") else float("nan")
            rows.append(row)
        except (KeyError, TypeError, ValueError):
            continue
    return rows


def sort_rows(rows: list[dict], classifiers, policies) -> list[dict]:
    order = {c: i for i, c in enumerate(classifiers)} | {p: i for i, p in enumerate(policies)}
    return sorted(rows, key=lambda r: (order.get(r[CLASSIFIER], 99), order.get(r[POLICY], 99),
                                       r[KEEP_FRACTION], r[SEED]))


def aggregate(rows: list[dict]) -> dict:
    """(classifier, policy, keep fraction) -> mean and sample std (ddof=1) of accuracy over seeds."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r[CLASSIFIER], r[POLICY], float(r[KEEP_FRACTION])), []).append(r)
    out = {}
    for key, rs in cells.items():
        acc = np.array([r[ACCURACY] for r in rs], dtype=np.float64)
        out[key] = {
            "mean": float(acc.mean()),
            "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "seeds": len(acc),
            N_TRAIN: sorted({int(r[N_TRAIN]) for r in rs}),
        }
    return out


def paired_differences(rows: list[dict], metric: str, baseline: str = "random") -> dict:
    """(classifier, policy, keep fraction) -> mean and sample std over seeds of (policy - baseline)
    in `metric`, paired by seed (the same seed's baseline run), and how many pairs."""
    base = {(r[CLASSIFIER], float(r[KEEP_FRACTION]), r[SEED]): r[metric] for r in rows if r[POLICY] == baseline}
    cells: dict[tuple, list[float]] = {}
    for r in rows:
        ref = base.get((r[CLASSIFIER], float(r[KEEP_FRACTION]), r[SEED]))
        if r[POLICY] != baseline and ref is not None and not (math.isnan(r[metric]) or math.isnan(ref)):
            cells.setdefault((r[CLASSIFIER], r[POLICY], float(r[KEEP_FRACTION])), []).append(r[metric] - ref)
    return {k: {"mean": float(np.mean(d)), "std": float(np.std(d, ddof=1)) if len(d) > 1 else 0.0, "pairs": len(d)}
            for k, d in cells.items()}


def _metric_table(rows, clf, policies, fractions, metric) -> list[str]:
    cells: dict[tuple, list[float]] = {}
    for r in rows:
        if r[CLASSIFIER] == clf and not math.isnan(r.get(metric, float("nan"))):
            cells.setdefault((r[POLICY], float(r[KEEP_FRACTION])), []).append(r[metric])
    lines = ["| policy | " + " | ".join(fraction_label(f) for f in fractions) + " |", "| --- |" + " ---: |" * len(fractions)]
    for p in policies:
        vals = [cells.get((p, f)) for f in fractions]
        lines.append(f"| {p} | " + " | ".join("–" if not v else f"{100 * np.mean(v):.1f}" for v in vals) + " |")
    return lines


def _paired_table(rows, clf, policies, fractions, metric, baseline, what) -> list[str]:
    """`metric` of each policy minus `baseline`'s, paired by seed (empty when there is no pair)."""
    diffs = paired_differences(rows, metric, baseline)
    if not any(k[0] == clf for k in diffs):
        return []
    lines = ["", f"{what} minus {baseline}'s, paired by seed (points, mean ± std, {clf}):", "",
             "| policy | " + " | ".join(fraction_label(f) for f in fractions) + " |", "| --- |" + " ---: |" * len(fractions)]
    for p in policies:
        if p == baseline:
            continue
        vals = [diffs.get((clf, p, f)) for f in fractions]
        lines.append(f"| {p} | " + " | ".join(
            "–" if v is None else f"{100 * v['mean']:+.1f} ± {100 * v['std']:.1f}" for v in vals) + " |")
    return lines


def _selection_table(rows, policies, fractions) -> list[str]:
    """Per policy and fraction: the share of copies and junk kept and the clusters covered (seed means)."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r[POLICY], float(r[KEEP_FRACTION])), []).append(r)
    captions = any(not math.isnan(r.get(MISCAPTIONED_KEPT, float("nan"))) for r in rows)
    lines = ["| policy | " + " | ".join(fraction_label(f) for f in fractions) + " |", "| --- |" + " ---: |" * len(fractions)]
    for p in policies:
        out = []
        for f in fractions:
            rs = cells.get((p, f), [])
            copies = np.nanmean([r[COPIES_KEPT] for r in rs]) if rs else float("nan")
            junk = np.nanmean([r[JUNK_KEPT] for r in rs]) if rs else float("nan")
            clusters = np.nanmean([r[CLUSTERS_COVERED] for r in rs]) if rs else float("nan")
            cell = f"{_pct(copies)} / {_pct(junk)} / {clusters:.0f}"
            if captions:
                cell += f" / {_pct(np.nanmean([r.get(MISCAPTIONED_KEPT, float('nan')) for r in rs]))}"
            out.append("–" if not rs else cell)
        lines.append(f"| {p} | " + " | ".join(out) + " |")
    return lines


def _pct(x: float) -> str:
    return "–" if math.isnan(x) else f"{100 * x:.0f}%"


def best_policies(agg: dict, classifier: str, policies, fractions) -> dict:
    """keep fraction -> the policy with the highest mean accuracy, or "tie" (e.g. at 1.0, where
    every policy keeps the whole pool): the paper's rule is read off this."""
    best = {}
    for f in fractions:
        scored = sorted(((agg[(classifier, p, f)]["mean"], p) for p in policies
                         if (classifier, p, f) in agg and not math.isnan(agg[(classifier, p, f)]["mean"])), reverse=True)
        if scored:
            best[f] = "tie" if len(scored) > 1 and scored[0][0] == scored[1][0] else scored[0][1]
    return best


def markdown_table(rows: list[dict], classifiers, policies, fractions, header: dict) -> str:
    """Per classifier: rows = policy, columns = keep fraction, cells = accuracy % mean ± std over seeds."""
    agg = aggregate(rows)
    shared = sum(1 for r in rows if r[SHARED_FROM])
    lines = [
        f"# Accuracy vs keep fraction: pool {header['pool']} ({header['n_pool']} samples)",
        "",
        f"Encoder `{header['model_id']}`{' (random init)' if header.get('random_init') else ''}, "
        f"k = {header['k']} prototypes; test set {header['n_test']} samples; seeds {', '.join(map(str, header['seeds']))}. "
        "Cells: test accuracy (%), mean ± std over seeds (sample std; the mean alone for one seed). "
        "The classifier sees the kept subset only"
        + ("; `clip`: a fresh CLIP pretrained by open_clip_train on the subset's shards for the same samples "
           "seen, scored zero-shot with class-name prompts." if CLIP in classifiers else "."),
        "",
        f"{len(rows)} runs; {shared} of them share the training of an identical run (same subset and seed: "
        "keep fraction 1.0 keeps the whole pool under every policy), named in `shared_from` of results.csv.",
    ]
    for clf in classifiers:
        lines += ["", f"## {clf}", "", "| policy | " + " | ".join(fraction_label(f) for f in fractions) + " |",
                  "| --- |" + " ---: |" * len(fractions)]
        for p in policies:
            cells = []
            for f in fractions:
                a = agg.get((clf, p, f))
                if a is None or math.isnan(a["mean"]):
                    cells.append("–")
                else:  # one seed has no spread to show
                    spread = f" ± {100 * a['std']:.1f}" if a["seeds"] > 1 else ""
                    cells.append(f"{100 * a['mean']:.1f}{spread}")
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
        n_cells = []
        for f in fractions:
            counts = sorted({n for p in policies for n in agg.get((clf, p, f), {}).get(N_TRAIN, [])})
            n_cells.append(" / ".join(map(str, counts)) or "–")
        lines.append("| n_train | " + " | ".join(n_cells) + " |")
        best = best_policies(agg, clf, policies, fractions)
        if best:
            lines += ["", "Best policy per keep fraction: " + ", ".join(f"{fraction_label(f)} {p}" for f, p in best.items()) + "."]
        if any(not math.isnan(r.get(BALANCED_ACCURACY, float("nan"))) for r in rows if r[CLASSIFIER] == clf):
            lines += ["", f"Balanced accuracy (%, {clf}), mean over seeds:", ""]
            lines += _metric_table(rows, clf, policies, fractions, BALANCED_ACCURACY)
            lines += ["", f"Mean accuracy of the 3 worst classes (%, {clf}):", ""]
            lines += _metric_table(rows, clf, policies, fractions, WORST3_ACCURACY)
            lines += _paired_table(rows, clf, policies, fractions, BALANCED_ACCURACY, "random", "Balanced accuracy")
        if clf == CLIP:
            for metric, name in ((RECALL_1, "recall@1"), (RECALL_5, "recall@5")):
                lines += ["", f"Image-text retrieval {name} on held-out pairs (%, both directions' mean, {clf}):", ""]
                lines += _metric_table(rows, clf, policies, fractions, metric)
            for baseline in ("random", CAPTION):
                lines += _paired_table(rows, clf, policies, fractions, ACCURACY, baseline, "Zero-shot accuracy")
    if any(not math.isnan(r.get(COPIES_KEPT, float("nan"))) or not math.isnan(r.get(CLUSTERS_COVERED, float("nan")))
           for r in rows):
        lines += ["", "## What each subset keeps", "",
                  "Share of the pool's near-copies kept / share of its junk kept / clusters covered"
                  + (" / share of its captions that do not describe their image kept" if any(
                      not math.isnan(r.get(MISCAPTIONED_KEPT, float("nan"))) for r in rows) else "") + ".", ""]
        lines += _selection_table(rows, policies, fractions)
    return "\n".join(lines) + "\n"


def accuracy_plot(rows: list[dict], classifiers, policies, fractions, title: str) -> bytes:
    """PNG: one subplot per classifier, accuracy vs keep fraction, one line per policy with error bars."""
    from matplotlib.figure import (
        Figure,  # no pyplot: no global backend state, Agg canvas
    )

    agg = aggregate(rows)
    fig = Figure(figsize=(max(7.0, 5.5 * len(classifiers)), 4.3), layout="constrained")
    axes = fig.subplots(1, len(classifiers), squeeze=False)[0]
    for ax, clf in zip(axes, classifiers):
        for p in policies:
            pts = [(f, agg[(clf, p, f)]) for f in fractions if (clf, p, f) in agg]
            if not pts:
                continue
            ax.errorbar([f for f, _ in pts], [100 * a["mean"] for _, a in pts], yerr=[100 * a["std"] for _, a in pts],
                        marker="o", markersize=4, capsize=3, label=p)
        ax.set_title(clf)
        ax.set_xlabel("keep fraction")
        ax.set_ylabel("zero-shot accuracy (%)" if clf == CLIP else "test accuracy (%)")
        ax.set_xticks(list(fractions))
        ax.set_xticklabels([fraction_label(f) for f in fractions])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9, wrap=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()
