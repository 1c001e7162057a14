"""report.html as a person sees it: rendered by headless Chromium (Debian's `chromium`), every
image loaded, the numbers of the manifest on the page, and a screenshot that is not blank."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading

import numpy as np
import pytest
from PIL import Image

from pipelines import report as report_module
from pipelines.cli import main, run
from pipelines.cli.config import validate_config
from pipelines.report import REPORT_FILE

from .conftest import small_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(*args) -> subprocess.CompletedProcess:
    assert CHROMIUM, "headless Chromium is needed (scripts/setup.sh installs Debian's chromium)"
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=120)


def test_report_renders_in_chromium_with_every_image(pipeline_run, run_copy, tmp_path, monkeypatch):
    cfg = validate_config(small_config(pipeline_run["cfg"].input, run_copy, **{
        "stages": ["embed", "prototypes", "assign", "dedup", "select", "write"], "dedup.eps": 0.002}))
    prepared_in = []  # the thread each preparation ran in: the run's own report thread, once
    real = report_module.prepare_report
    monkeypatch.setattr(report_module, "prepare_report",
                        lambda *a, **kw: prepared_in.append(threading.current_thread().name) or real(*a, **kw))
    manifest = run(cfg)
    assert prepared_in == ["report"]  # prepared while the write stage ran, not after the run
    page = run_copy / REPORT_FILE
    assert page.exists() and 0 < manifest["counts"]["removed"] < manifest["counts"]["kept"]
    print(manifest["counts"])
    dom = _chromium("--virtual-time-budget=10000", "--dump-dom", page.as_uri()).stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    n_images = int(re.search(r'data-images="(\d+)"', body).group(1))
    assert re.search(r'data-broken-images="0"', body), body  # every plot and thumbnail loaded
    k = cfg.kmeans.k
    assert n_images >= 4 + 3 * k  # the plots, and at least one picture per kind and cluster
    c = manifest["counts"]
    for label, value in (("kept", c["kept"]), ("pruned", c["pruned"]), ("removed (curation)", c["removed"]),
                         ("failed", c["failed"])):
        assert f"<td>{label}</td><td class=\"n\">{value:,}</td>" in dom
    assert "Near-duplicate groups removed" in dom and "removed: near_duplicate" in dom
    for reason in c["failed_by_reason"]:
        assert f"failed: {reason}" in dom
    shot = tmp_path / "report.png"
    _chromium("--window-size=1280,2400", f"--screenshot={shot}", page.as_uri())
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    print(f"screenshot of the report: {shot}")
    assert pixels.shape == (2400, 1280) and (pixels < 128).mean() > 0.05  # plots and pictures, not a white page


def test_report_verb_rebuilds_it_and_names_a_directory_without_a_run(pipeline_run, run_copy, tmp_path, capsys):
    """The verb builds the page from the outputs alone; the run prepared its parts while the write
    stage ran (pipelines.report.ReportInAdvance): the same page, byte for byte."""
    made_by_the_run = (run_copy / REPORT_FILE).read_bytes()
    (run_copy / REPORT_FILE).unlink()
    assert main(["report", str(run_copy)]) == 0
    assert (run_copy / REPORT_FILE).read_bytes() == made_by_the_run
    html = (run_copy / REPORT_FILE).read_text()
    assert json.loads((run_copy / "manifest.json").read_text())["model_id"] in html
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "has no manifest.json" in capsys.readouterr().err


def test_per_shard_summaries_merge_to_those_of_the_whole_table():
    """What the driver merges equals what one pass over all samples gives (so nothing per sample
    has to reach it): histograms, per-cluster counts, and each cluster's nearest/farthest/random."""
    import pyarrow as pa

    from prune import schema
    from prune.report.summary import Counts, best_picks, shard_counts, shard_picks

    rng = np.random.default_rng(0)
    n, k = 600, 7
    status = np.where(rng.random(n) < 0.05, "undecodable_image", np.where(rng.random(n) < 0.1, "near_duplicate", "ok"))
    table = pa.table({schema.KEY: [f"{i:09d}" for i in range(n)], schema.STATUS: status,
                      schema.CLUSTER: rng.integers(0, k, n).astype(np.int32), schema.DISTANCE: rng.random(n) * 0.6,
                      schema.KEEP: (rng.random(n) < 0.5) & (status == "ok")})
    parts = [table.slice(a, b - a) for a, b in ((0, 100), (100, 350), (350, 600))]
    merged = Counts()
    for part in parts:
        merged = merged.merge(shard_counts(part, k))
    whole = shard_counts(table, k)
    for name in ("kept_hist", "pruned_hist", "removed_hist", "cluster_total", "cluster_kept", "cluster_removed"):
        assert np.array_equal(getattr(merged, name), getattr(whole, name)), name
    assert merged.cluster_total.sum() == (status != "undecodable_image").sum()
    assert merged.removed_hist.sum() == (status == "near_duplicate").sum()
    per_shard = best_picks([p for i, part in enumerate(parts) for p in shard_picks("s", part, [0, 3])])
    one_pass = best_picks(shard_picks("s", table, [0, 3]))
    assert [(p.cluster, p.kind, p.key) for p in per_shard] == [(p.cluster, p.kind, p.key) for p in one_pass]
    ok0 = (status == "ok") & (table.column(schema.CLUSTER).to_numpy() == 0)
    nearest = sorted(np.nonzero(ok0)[0], key=lambda i: table.column(schema.DISTANCE).to_numpy()[i])[:6]
    assert [p.key for p in one_pass if p.cluster == 0 and p.kind == "nearest"] == [f"{i:09d}" for i in nearest]


def test_a_report_prepared_in_advance_raises_what_preparing_raised(tmp_path):
    """A failure in the report's thread reaches the run (which logs it and keeps its outputs), and
    nothing is prepared before the selection is done."""
    import pyarrow as pa

    from pipelines.report import ReportInAdvance
    from prune.io.storage import OutputDir

    early = ReportInAdvance(OutputDir(str(tmp_path)), {"input": str(tmp_path / "no-such-input")}, _stages(*ORDER))
    early.stage_done("assign", {})
    assert early.parts() is None  # not started: the selection is not done
    (tmp_path / "scores").mkdir()
    (tmp_path / "scores" / "00000.parquet").write_bytes(b"not parquet")
    early.stage_done("select", {})
    with pytest.raises(pa.ArrowInvalid):
        early.parts()


ORDER = ("embed", "prototypes", "assign", "select", "write")


def _stages(*names):
    from pipelines.stage import STAGES

    return [STAGES.get(n)() for n in names]


def test_the_report_is_prepared_after_select_and_stops_with_a_failed_run(run_copy):
    """What the report reads is final once select is done, whatever follows it (no stage rewrites
    the scores, and no curation stage may follow select); a run without select prepares nothing.
    A run that fails stops the preparation at its next pass."""
    from pipelines.report import Cancelled, ReportInAdvance
    from prune.io.storage import OutputDir

    out = OutputDir(str(run_copy))
    none = ReportInAdvance(out, {}, _stages("embed", "prototypes", "assign", "dedup"))
    none.stage_done("dedup", {})
    assert none.after is None and none.parts() is None
    assert ReportInAdvance(out, {}, _stages(*ORDER, "export")).after == "select"
    assert ReportInAdvance(out, {}, _stages("embed", "prototypes", "assign", "select", "export", "write")).after == "select"
    stopped = ReportInAdvance(out, {}, _stages(*ORDER))
    stopped.cancel()  # the run failed before select was done
    stopped.stage_done("select", {})
    with pytest.raises(Cancelled):
        stopped.parts()
