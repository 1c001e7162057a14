"""The report page: plots drawn with matplotlib, images and plots embedded, one file."""

from __future__ import annotations

import html
import io
import json

import numpy as np

from prune.report.summary import DIST_EDGES, SCORE_EDGES, Alignment, Counts
from prune.report.thumbnails import png_uri

KINDS = ("nearest", "farthest", "random")
STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1200px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; } td, th { border: 1px solid #ccc; padding: 3px 8px; }
td.n { text-align: right; } .plots img { width: 560px; margin: 4px; border: 1px solid #eee; }
.grid { display: flex; flex-wrap: wrap; gap: 4px; margin: 2px 0 10px 0; align-items: center; }
.grid img { width: 64px; height: 64px; border: 3px solid #bbb; image-rendering: pixelated; }
.grid img.kept { border-color: #2a9d4b; } .grid img.pruned { border-color: #d1495b; }
.grid img.dupkept { border-color: #2a6fd1; } .label { width: 70px; font-size: 12px; color: #555; }
.note { color: #555; font-size: 13px; }
.pairs { display: flex; flex-wrap: wrap; gap: 8px; } .pair { width: 180px; font-size: 12px; }
.pair img { width: 96px; height: 96px; border: 3px solid #bbb; image-rendering: pixelated; display: block; }
.pair img.kept { border-color: #2a9d4b; } .pair img.pruned { border-color: #d1495b; }
"""
# set by the page itself once loaded: how many <img> failed to load (a test reads it)
CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const broken = imgs.filter(i => !i.complete || i.naturalWidth === 0).length;
  document.body.dataset.images = imgs.length; document.body.dataset.brokenImages = broken;
});
</script>"""


def import_plotting() -> None:
    """Import what the plots need (matplotlib's figure and Agg canvas): a run does it early, in a
    thread, while its light stages wait on Ray."""
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.figure  # noqa: F401


def _figure(height: float = 3.4):
    """A figure and its axes, without pyplot: each figure is its own, so the data plots can be
    drawn in a thread while the run goes on (pyplot's global state is not thread-safe)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.2, height))
    return fig, fig.subplots()


def _figure_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return png_uri(buf.getvalue())


def data_plots(counts: Counts) -> dict[str, str]:
    """name -> PNG data URI of each plot of the scores: distances, cluster sizes, kept share."""
    out = {}
    used = np.nonzero(counts.kept_hist + counts.pruned_hist + counts.removed_hist)[0]
    lo, hi = (used.min(), used.max() + 1) if len(used) else (0, 1)
    step = max(1, -(-(hi - lo) // 40))  # about 40 bars over the distances that occur
    edges = DIST_EDGES[lo : hi + step : step]
    regroup = lambda h: np.add.reduceat(h[lo:hi], np.arange(0, hi - lo, step))  # noqa: E731
    kept, pruned, removed = regroup(counts.kept_hist), regroup(counts.pruned_hist), regroup(counts.removed_hist)
    centers, width = (edges[:-1] + edges[1:])[: len(kept)] / 2, edges[1] - edges[0]
    fig, ax = _figure()
    ax.bar(centers, kept, width, color="#2a9d4b", label="kept")
    ax.bar(centers, pruned, width, bottom=kept, color="#d1495b", label="pruned")
    if removed.any():
        ax.bar(centers, removed, width, bottom=kept + pruned, color="#999999", label="removed (curation)")
    ax.set(xlabel="distance to the nearest prototype (1 - cosine)", ylabel="samples", title="Distances: kept vs pruned")
    ax.legend()
    out["distances"] = _figure_uri(fig)

    sizes = counts.cluster_total[counts.cluster_total > 0]
    fig, ax = _figure()
    ax.hist(sizes, bins=min(40, max(5, len(sizes))), color="#4c72b0")
    ax.set(xlabel="cluster size (samples)", ylabel="clusters", title=f"Cluster sizes ({len(sizes)} non-empty clusters)")
    out["cluster_sizes"] = _figure_uri(fig)

    fig, ax = _figure()
    nz = counts.cluster_total > 0
    ax.scatter(counts.cluster_total[nz], counts.cluster_kept[nz] / counts.cluster_total[nz], s=12, color="#4c72b0")
    ax.set(xlabel="cluster size (samples)", ylabel="share kept", ylim=(-0.03, 1.03), title="Kept share per cluster")
    if nz.sum() > 1 and counts.cluster_total[nz].max() > 20 * max(1, counts.cluster_total[nz].min()):
        ax.set_xscale("log")
    out["kept_share"] = _figure_uri(fig)
    return out


def alignment_plot(alignment: Alignment) -> dict[str, str]:
    """{"alignment": PNG data URI} of the clip score of kept, pruned and removed pairs."""
    colors = {"kept": "#2a9d4b", "pruned": "#d1495b", "low_alignment": "#999999", "removed (other)": "#cccccc"}
    total = sum(alignment.hists.values())
    used = np.nonzero(total)[0] if not np.isscalar(total) else np.zeros(0, int)
    if not len(used):
        return {}
    lo, hi = used.min(), used.max() + 1
    step = max(1, -(-(hi - lo) // 40))
    edges = SCORE_EDGES[lo : hi + step : step]
    fig, ax = _figure()
    bottom = None
    for name, color in colors.items():
        h = np.add.reduceat(np.asarray(alignment.hists.get(name, np.zeros(len(SCORE_EDGES) - 1)))[lo:hi],
                            np.arange(0, hi - lo, step))
        centers = (edges[:-1] + edges[1:])[: len(h)] / 2
        if h.any():
            ax.bar(centers, h, edges[1] - edges[0], bottom=bottom, color=color, label=name.replace("_", " "))
        bottom = h if bottom is None else bottom + h
    ax.set(xlabel="clip score (cosine of caption and image)", ylabel="samples",
           title="Caption-image agreement: kept vs removed")
    ax.legend()
    return {"alignment": _figure_uri(fig)}


def timings_plot(timings: dict) -> dict[str, str]:
    """{"timings": PNG data URI} of the wall time per stage (empty when no stage was timed)."""
    stage_times = {k: v for k, v in timings.items() if k != "total"}
    if not stage_times:
        return {}
    fig, ax = _figure(0.5 + 0.35 * len(stage_times))
    ax.barh(list(stage_times)[::-1], list(stage_times.values())[::-1], color="#8172b2")
    ax.set(xlabel="seconds (0 when reused)", title=f"Wall time per stage (total {timings.get('total', 0):.1f} s)")
    return {"timings": _figure_uri(fig)}


def _table(rows, head=None) -> str:
    cells = "".join(
        "<tr>" + "".join(f'<td class="n">{c:,}</td>' if isinstance(c, (int, np.integer)) and not isinstance(c, bool)
                         else f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    top = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" if head else ""
    return f"<table>{top}{cells}</table>"


def _img(uri: str | None, css: str, title: str) -> str:
    if uri is None:
        return f'<span class="note">[{html.escape(title)}: not decodable]</span>'
    return f'<img class="{css}" src="{uri}" title="{html.escape(title)}" alt="{html.escape(title)}">'


def _pairs(low_pairs: list, without_caption: int) -> str:
    """The lowest-agreeing pairs: each image with its caption, score and fate."""
    cells = "".join(
        f"<div class='pair'>{_img(uri, 'kept' if kept else 'pruned', key)}<b>{score:.3f}</b> "
        f"{html.escape(status.replace('_', ' ') if status != 'ok' else ('kept' if kept else 'pruned'))}<br>"
        f"{html.escape((caption or '[no caption read]')[:160])}</div>"
        for uri, caption, score, status, kept, key in low_pairs)
    return ("<h2>Lowest caption-image agreement</h2><p class='note'>The pairs whose caption agrees least with "
            f"the image (clip score, lowest first); {without_caption:,} samples had no caption (no score). "
            "Green border: kept; red: not kept.</p>" f"<div class='pairs'>{cells}</div>")


def render(manifest: dict, counts: Counts, grids: dict, duplicates: list, plot_uris: dict,
           low_pairs: list = (), without_caption: int = 0) -> str:
    """The page. `grids`: cluster -> kind -> [(uri, distance, kept, key)]; `duplicates`:
    [(kept (uri, key), [(uri, key, similarity)], n_removed)]; `low_pairs` (with embed.text):
    [(uri, caption, score, status, kept, key)]."""
    c = manifest.get("counts", {})
    cfg = manifest.get("config", {})
    sel = cfg.get("select", {})
    auto = (manifest.get("stages", {}).get("select") or {}).get("auto")
    if auto:  # select.policy auto: what it chose stands in for the config's settings
        sel = {**sel, **auto["settings"]}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>ssl-prune report</title><style>{STYLE}</style>"
             f"</head><body><h1>ssl-prune run report</h1>"]
    parts.append(f"<p class='note'>input <code>{html.escape(str(cfg.get('input', '')))}</code> &rarr; output "
                 f"<code>{html.escape(str(cfg.get('output', '')))}</code>; model <code>"
                 f"{html.escape(str(manifest.get('model_id', '')))}</code>; stages "
                 f"{html.escape(', '.join(cfg.get('stages', [])))}; policy {html.escape(str(sel.get('policy')))}"
                 f"{' (per cluster, budget ' + html.escape(str(sel.get('budget'))) + ')' if sel.get('balanced') else ''}"
                 f", keep fraction {sel.get('keep_fraction')}; k = {counts.cluster_total.size}</p>")
    if auto:
        parts.append(f"<p class='note auto'><b>select.policy auto chose the {html.escape(auto['rule'])} rule</b>: "
                     f"{html.escape(auto['reason'])}.</p>")
    parent = manifest.get("parent")
    drift = ((manifest.get("stages") or {}).get("drift") or {}).get("record")
    if parent:
        parts.append(f"<p class='note'>This run <b>extends</b> <code>{html.escape(str(parent.get('output')))}</code> "
                     "(its model, centroids and thresholds; its outputs only read).</p>")
    if drift:
        parts.append("<h2>Drift against the parent</h2><p class='note'>"
                     f"<b>{html.escape(drift['recommendation'])}</b>. Beyond the parent's own 95th percentile of "
                     f"its cluster: {drift['share_beyond_own_cluster_p95']:.1%}. The clusters whose new samples lie "
                     "farthest:</p>" + _table([(c["cluster"], c["new"], f"{c['share_beyond']:.1%}", f"{c['parent_p95']:.3f}")
                                                  for c in drift["clusters"][:10]],
                                                 ("cluster", "new samples", "beyond the parent's p95", "parent's p95")))
    parts.append("<h2>Counts</h2>" + _table([
        ("input samples", c.get("input_samples", 0)), ("kept", c.get("kept", 0)), ("pruned", c.get("pruned", 0)),
        ("removed (curation)", c.get("removed", 0)), ("failed", c.get("failed", 0)),
        ("input shards", c.get("input_shards", 0)), ("output shards", c.get("output_shards", 0))]))
    reasons = [(f"failed: {r}", n) for r, n in c.get("failed_by_reason", {}).items()]
    reasons += [(f"removed: {r}", n) for r, n in c.get("removed_by_reason", {}).items()]
    reasons += [(f"shard {s} failed", str(why)) for s, why in c.get("shard_failures", {}).items()]
    parts.append("<h3>By reason</h3>" + (_table(reasons) if reasons else "<p class='note'>no failure, nothing removed</p>"))
    parts.append("<h2>Plots</h2><div class='plots'>" + "".join(
        f'<img src="{u}" alt="{n}" title="{n}">' for n, u in plot_uris.items()) + "</div>")
    parts.append("<h2>Clusters</h2><p class='note'>For a few clusters spread over the size order: the members nearest "
                 "their prototype, the farthest, and a random few. Green border: kept; red: pruned.</p>")
    for cl, kinds in grids.items():
        total, kept, gone = (int(a[cl]) for a in (counts.cluster_total, counts.cluster_kept, counts.cluster_removed))
        removed = f", {gone:,} removed by curation" if gone else ""
        parts.append(f"<h3>cluster {cl}: {total:,} samples, {kept:,} kept ({kept / max(total, 1):.0%}){removed}</h3>")
        for kind in KINDS:
            cells = "".join(_img(uri, "kept" if k else "pruned", f"{key} d={d:.3f} {'kept' if k else 'pruned'}")
                            for uri, d, k, key in kinds.get(kind, []))
            parts.append(f"<div class='grid'><span class='label'>{kind}</span>{cells}</div>")
    if duplicates:
        parts.append("<h2>Near-duplicate groups removed</h2><p class='note'>Blue: the member kept; red: members the "
                     "dedup stage removed as its near-copies (largest groups of a few shards).</p>")
        for (kuri, kkey), removed, n in duplicates:
            cells = _img(kuri, "dupkept", f"kept {kkey}") + "".join(
                _img(u, "pruned", f"{key} cos={s:.4f}") for u, key, s in removed)
            parts.append(f"<div class='grid'><span class='label'>{n} removed</span>{cells}</div>")
    if low_pairs:
        parts.append(_pairs(low_pairs, without_caption))
    bands = manifest.get("bands") or []
    if bands:
        parts.append("<h2>Bands</h2><p class='note'>A prefix of the pruned shards is a smaller keep fraction.</p>" +
                     _table([(b["band"], b["keep_fraction"], b["samples"], b["cumulative_samples"], b["prefix"] or "")
                             for b in bands], ("band", "keep fraction", "samples", "cumulative", "shards (prefix)")))
    timings = manifest.get("timings_s", {})
    parts.append("<h2>Stages</h2>" + _table(
        [(s, f"{timings.get(s, 0):.2f} s", "reused" if st.get("reused") else "computed",
          manifest.get("fingerprints", {}).get(s, "")) for s, st in manifest.get("stages", {}).items()],
        ("stage", "wall time", "", "fingerprint")))
    parts.append("<h2>Config</h2><pre>" + html.escape(json.dumps(cfg, indent=1, sort_keys=True)) + "</pre>")
    parts.append(CHECK + "</body></html>")
    return "\n".join(parts)
