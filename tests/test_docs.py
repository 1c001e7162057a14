"""The README as configs and code point to it: every section they name is there.

A section lost from the README (an edit once dropped a third of it, results tables included, and
nothing failed) leaves configs and docstrings pointing at nothing; this makes that a failure.
"""

from __future__ import annotations

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parent.parent
# README, "What to use" / README, 'A self-supervised ...' / README's "Capacity plan" / README "Capacity plan"
REFERENCE = re.compile(r"""README(?:'s)?,?\s+["']([^"']+)["']""")


def _headings() -> list[str]:
    return [line.lstrip("#").strip() for line in (REPO / "README.md").read_text().splitlines() if line.startswith("#")]


def _references() -> list[tuple[str, str]]:
    found = []
    for pattern in ("configs/*.yaml", "cluster/*", "prune/**/*.py", "pipelines/**/*.py", "benchmarks/*.py"):
        for path in REPO.glob(pattern):
            if path.is_file():
                for name in REFERENCE.findall(path.read_text(errors="replace")):
                    found.append((str(path.relative_to(REPO)), name))
    return found


def test_every_readme_section_named_elsewhere_exists():
    refs = _references()
    assert len(refs) >= 5, refs  # the pattern still finds the references it was written for
    headings = _headings()
    missing = [(where, name) for where, name in refs if not any(h.startswith(name) for h in headings)]
    assert not missing, f"README sections named but not there: {missing}"


def test_the_readme_keeps_its_main_parts():
    headings = _headings()
    for part in ("Set-up and the two commands", "Output layout", "How it runs", "Does pruning keep accuracy?",
                 "What to use", "Results on a web-like pool", "Results on clean Fashion-MNIST", "On a cluster",
                 "Capacity plan", "Layout of the code", "Benchmark"):
        assert any(h.startswith(part) for h in headings), part
