"""The docs build as a static site (mkdocs, strict): a dead link, a missing page or a missing anchor
fails the build, and so this test; the second half shows that it really does."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parent.parent
MKDOCS = [sys.executable, "-m", "mkdocs"]  # the venv's, installed by the test extra (scripts/setup.sh)


def _build(root: pathlib.Path, site: pathlib.Path) -> subprocess.CompletedProcess:
    # not --quiet: mkdocs counts the warnings strict mode fails on only when it logs them
    return subprocess.run(MKDOCS + ["build", "--strict", "--site-dir", str(site)], cwd=root, capture_output=True,
                          text=True, timeout=120)


def test_the_docs_build_strict(tmp_path):
    res = _build(REPO, tmp_path / "site")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "WARNING" not in res.stderr, res.stderr
    nav = [page for entry in yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"] for page in entry.values()]
    assert len(nav) >= 10 and "configuration.md" in nav
    for page in nav:  # every page of the nav, rendered
        assert (tmp_path / "site" / page.replace(".md", ".html")).is_file(), page


def _copy(tmp_path: pathlib.Path) -> pathlib.Path:
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(REPO / "mkdocs.yml", root)
    shutil.copytree(REPO / "docs", root / "docs")
    return root


def _dead_page_link(docs: pathlib.Path) -> str:
    page = docs / "getting-started.md"
    page.write_text(page.read_text() + "\nSee [nothing](no-such-page.md).\n")
    return "no-such-page.md"


def _dead_anchor(docs: pathlib.Path) -> str:
    page = docs / "getting-started.md"
    page.write_text(page.read_text() + "\nSee [nothing](concepts.md#no-such-heading).\n")
    return "#no-such-heading"


def _missing_page(docs: pathlib.Path) -> str:
    (docs / "faults.md").unlink()  # the nav lists it, other pages link to it
    return "faults.md"


@pytest.mark.parametrize("breakage", [_dead_page_link, _dead_anchor, _missing_page])
def test_a_dead_link_or_a_missing_page_fails_the_build(tmp_path, breakage):
    root = _copy(tmp_path)
    named = breakage(root / "docs")
    res = _build(root, tmp_path / "site")
    out = res.stdout + res.stderr
    assert res.returncode != 0, f"{breakage.__name__} did not fail the build:\n{out}"
    assert "strict mode" in out and named in out, out
