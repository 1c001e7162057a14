"""report.html for a run's output directory: written after every `ssl-prune run`, rebuilt by
`ssl-prune report OUT`. Two passes over the scores and one over the few tars that hold the pictured
samples, through `pending.per_shard` (on the driver for local outputs, in Ray tasks on object
stores): what reaches the driver is histograms, per-cluster counts and a few dozen thumbnails.

What the scores, the dedup outputs and the input tars decide (`prepare_report`) is final once the
selection is: a run prepares it in a thread while the write stage runs (`ReportInAdvance`), and
only the page itself waits for the manifest.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

from prune import schema
from prune.embed.text import decode_caption
from prune.io.storage import OutputDir, split_url
from prune.io.tables import read_scores
from prune.io.tar_index_cache import index_for
from prune.io.tar_spans import read_member
from prune.report.html import alignment_plot, data_plots, import_plotting, render, timings_plot
from prune.report.summary import (
    Alignment,
    Counts,
    best_picks,
    chosen_clusters,
    duplicate_groups,
    shard_alignment,
    shard_counts,
    shard_picks,
)
from prune.report.thumbnails import thumbnail_uri

from .inputs import resolve_shards
from .pending import per_shard

REPORT_FILE = "report.html"
log = logging.getLogger("ssl_prune")
_COLUMNS = [schema.KEY, schema.STATUS, schema.CLUSTER, schema.DISTANCE, schema.KEEP]


def _counts(k: int, out: OutputDir, shard: str) -> Counts:
    return shard_counts(read_scores(out, shard, columns=_COLUMNS), k)


def _picks(clusters: list, out: OutputDir, shard: str) -> list:
    return shard_picks(shard, read_scores(out, shard, columns=_COLUMNS), clusters)


_DEDUP = schema.removals_dir("dedup")  # the dedup stage's removals: who duplicates whom


def _dups(out: OutputDir, shard: str) -> list:
    if not out.exists(_DEDUP, schema.shard_file(shard)):
        return []
    import pyarrow.parquet as pq

    with out.open(_DEDUP, schema.shard_file(shard)) as f:
        return duplicate_groups(shard, pq.read_table(f))


def _thumbs(wanted: dict, extensions: tuple, out: OutputDir, shard: str) -> dict:
    """key -> (thumbnail URI, caption) of the wanted samples of one input shard (read once)."""
    url, keys = wanted[shard]
    found = {}
    fs, path = split_url(url)
    with fs.open(path, "rb") as f:  # the embed stage's index or the headers, then only the pictured images' bytes
        for sample in index_for(out, shard, url, f).samples():
            if sample.key in keys and sample.key not in found:
                member, txt = sample.member(extensions), sample.member((schema.CAPTION_MEMBER,))
                found[sample.key] = (thumbnail_uri(read_member(f, member)) if member else None,
                                     decode_caption(read_member(f, txt)) if txt else None)
    return found


def _alignment(out: OutputDir, shard: str) -> Optional[Alignment]:
    """A shard's clip scores beside its selection (None: its embeddings have none)."""
    import pyarrow.parquet as pq

    with out.open(schema.EMBEDDINGS_DIR, schema.shard_file(shard)) as f:
        pf = pq.ParquetFile(f)
        if schema.CLIP_SCORE not in pf.schema_arrow.names:
            return None
        score = pf.read(columns=[schema.CLIP_SCORE]).column(0).to_numpy(zero_copy_only=False).astype("float32")
    return shard_alignment(shard, read_scores(out, shard, columns=[schema.KEY, schema.STATUS, schema.KEEP]), score)


@dataclass
class ReportParts:
    """The page's parts that the scores, dedup outputs and input tars decide."""

    counts: Counts
    grids: dict  # cluster -> kind -> [(thumbnail URI, distance, kept, key)]
    duplicates: list  # [((kept URI, key), [(URI, key, similarity)], n_removed)]
    plot_uris: dict  # the data plots (the stage timings are drawn with the manifest)
    low_pairs: list = field(default_factory=list)  # with embed.text: [(URI, caption, score, status, kept, key)]
    without_caption: int = 0


def prepare_report(out: OutputDir, cfg: dict, k: int, check: Callable[[], None] = lambda: None) -> ReportParts:
    """Counts, pictured samples, duplicate groups and data plots of a run whose selection is done
    (`cfg`: the run's config, for its input and image extensions; `k`: prototypes; `check()`
    between passes may raise to stop)."""
    try:
        inputs = resolve_shards(cfg["input"])
    except Exception as exc:  # noqa: BLE001 - the report still shows everything but the pictures
        log.warning("report: input %s not readable (%s): no pictures", cfg.get("input"), exc)
        inputs = {}
    shards = sorted(n.removesuffix(".parquet") for n in out.listdir(schema.SCORES_DIR) if n.endswith(".parquet"))
    counts = Counts()
    for part in per_shard(out, shards, functools.partial(_counts, k)).values():
        counts = counts.merge(part)
    check()
    clusters = chosen_clusters(counts.cluster_total)
    picks = best_picks([p for ps in per_shard(out, shards, functools.partial(_picks, clusters)).values() for p in ps])
    groups = []
    if out.exists(_DEDUP):  # a run with the dedup stage: its removed groups
        for found in per_shard(out, shards, _dups).values():
            groups += found
    groups = sorted(groups, key=lambda g: -g.n_removed)[:6]
    alignment = None
    for part in per_shard(out, shards, _alignment).values():
        if part is not None:
            alignment = part if alignment is None else alignment.merge(part)
    check()

    wanted: dict[str, tuple[str, set]] = {}
    def want(shard, key):  # noqa: E306
        if shard in inputs:
            wanted.setdefault(shard, (inputs[shard], set()))[1].add(key)
    for p in picks:
        want(p.shard, p.key)
    for g in groups:
        want(g.kept_shard, g.kept_key)
        for shard, key, _ in g.removed:
            want(shard, key)
    for _, shard, key, _, _ in (alignment.lowest if alignment else []):
        want(shard, key)
    extensions = tuple(cfg.get("image_extensions") or schema.IMAGE_EXTENSIONS_DEFAULT)
    thumbs = per_shard(out, sorted(wanted), functools.partial(_thumbs, wanted, extensions))
    check()
    uri = lambda shard, key: thumbs.get(shard, {}).get(key, (None, None))[0]  # noqa: E731

    grids: dict = {c: {} for c in clusters}
    for p in sorted(picks, key=lambda p: (p.cluster, p.kind, p.rank)):
        grids[p.cluster].setdefault(p.kind, []).append((uri(p.shard, p.key), p.distance, p.kept, p.key))
    duplicates = [((uri(g.kept_shard, g.kept_key), g.kept_key), [(uri(s, key), key, sim) for s, key, sim in g.removed],
                   g.n_removed) for g in groups]
    plots = data_plots(counts)
    if alignment is None:
        return ReportParts(counts, grids, duplicates, plots)
    low = [(uri(shard, key), thumbs.get(shard, {}).get(key, (None, None))[1], score, status, kept, key)
           for score, shard, key, status, kept in alignment.lowest]
    return ReportParts(counts, grids, duplicates, plots | alignment_plot(alignment), low, alignment.without_caption)


def build_report(output: str, parts: Optional[ReportParts] = None) -> str:
    """Write `<output>/report.html` from the run's manifest and outputs (`parts`: prepared
    already, during the run); returns its path."""
    out = OutputDir(output)
    manifest = out.read_json(schema.MANIFEST)
    if parts is None:
        k = int(manifest.get("stages", {}).get("prototypes", {}).get("k") or 0)
        parts = prepare_report(out, manifest.get("config", {}), k)
    page = render(manifest, parts.counts, parts.grids, parts.duplicates,
                  parts.plot_uris | timings_plot(manifest.get("timings_s", {})), parts.low_pairs, parts.without_caption)
    with out.open_atomic(REPORT_FILE) as f:
        f.write(page.encode())
    return out.path(REPORT_FILE)


class Cancelled(Exception):
    """The run ended (failed) before its report was prepared."""


class ReportInAdvance:
    """Prepares a run's report parts in a thread once its selection is done, while the stages
    after it (write) run: on a small run the report's second would otherwise come after them.
    What it reads (scores/, removals/dedup/) is final then: every stage owns its outputs, and no
    curation stage may follow select (`check_order`). A daemon thread, stopped between its passes
    when the run fails (`cancel`)."""

    def __init__(self, out: OutputDir, cfg: dict, stages: list):
        self.out, self.cfg = out, cfg
        select = [s for s in stages if s.name == "select"]
        self.after = select[0].label if select else None
        self._thread: Optional[threading.Thread] = None
        self._warmed = False
        self._stop = threading.Event()
        self._result: list = []  # [ReportParts] or [exception]

    def stage_done(self, label: str, stats: dict) -> None:
        """The executor's call after each stage (`stats`: every finished stage's, by label)."""
        if self.after is not None and not self._warmed:  # after the first stage (embed, the heavy one)
            self._warmed = True
            # matplotlib's import (0.3 s of CPU) while the light stages before select wait on Ray
            threading.Thread(target=import_plotting, name="report-imports", daemon=True).start()
        if label != self.after or self._thread is not None:
            return
        k = int(getattr(stats.get("prototypes"), "k", 0) or 0)
        self._thread = threading.Thread(target=self._prepare, args=(k,), name="report", daemon=True)
        self._thread.start()

    def _prepare(self, k: int) -> None:
        try:
            self._result.append(prepare_report(self.out, self.cfg, k, self._check))
        except Exception as exc:  # noqa: BLE001 - re-raised by parts(), in the run's thread
            self._result.append(exc)

    def _check(self) -> None:
        if self._stop.is_set():
            raise Cancelled("the run ended before its report was prepared")

    def cancel(self, wait_s: float = 30.0) -> None:
        """The run failed: stop at the next pass, and wait for that (a bounded time)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(wait_s)

    def parts(self) -> Optional[ReportParts]:
        """The prepared parts (None: never started); raises what preparing raised."""
        if self._thread is None:
            return None
        self._thread.join()
        if not self._result:
            raise RuntimeError("the report's preparation ended without a result")
        if isinstance(self._result[0], Exception):
            raise self._result[0]
        return self._result[0]
