"""The docs as configs and code point to them: every section they name is there, and the README's
links land.

A section lost from the docs (an edit once dropped a third of the README, results tables included,
and nothing failed) leaves configs and docstrings pointing at nothing; this makes that a failure.
A citation names its page: `docs/evaluation.md, "What to use"` (or `docs/concepts.md's "..."`),
and `README, "Set-up and the two commands"` for the sections the README itself keeps.
"""

from __future__ import annotations

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
# README, "Set-up ..." / README's "Set-up ..." / README "Set-up ..." (not cluster/README.md's)
README_REFERENCE = re.compile(r"""(?<![\w/.-])README(?:'s)?,?\s+["']([^"']+)["']""")
# docs/concepts.md, "What to use" / docs/cluster.md's "Capacity plan"
DOCS_REFERENCE = re.compile(r"""\bdocs/([\w-]+\.md)(?:'s)?,?\s+["']([^"']+)["']""")
CITING = ("configs/*.yaml", "cluster/*", "cluster/**/*.yaml", "prune/**/*.py", "pipelines/**/*.py", "benchmarks/*.py",
          "tests/*.py", "scripts/*.sh", ".ci/*")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def headings(path: pathlib.Path) -> list[str]:
    """The Markdown headings of a page, code blocks left out."""
    found, fence = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and line.startswith("#"):
            found.append(line.lstrip("#").strip())
    return found


def _citations() -> list[tuple[str, str, str]]:
    """(citing file, cited page, section) for every citation in configs and code."""
    found = []
    paths = {path for pattern in CITING for path in REPO.glob(pattern) if path.is_file()}
    for path in sorted(paths - {pathlib.Path(__file__).resolve()}):
        text = path.read_text(errors="replace")
        where = str(path.relative_to(REPO))
        found += [(where, "README.md", name) for name in README_REFERENCE.findall(text)]
        found += [(where, f"docs/{page}", name) for page, name in DOCS_REFERENCE.findall(text)]
    return found


def test_every_section_named_elsewhere_exists_on_the_page_it_names():
    refs = _citations()
    assert len(refs) >= 15, refs  # the patterns still find the citations they were written for
    assert {page for _, page, _ in refs} >= {"docs/concepts.md", "docs/evaluation.md", "docs/extending.md"}
    missing = []
    for where, page, name in refs:
        path = REPO / page
        if not path.is_file() or not any(h.startswith(name) for h in headings(path)):
            missing.append(f'{where}: {page}, "{name}"')
    assert not missing, "sections named but not there:\n" + "\n".join(missing)


# the parts a reader looks for, by page; the results tables among them
MAIN_PARTS = {
    "README.md": ["Set-up and the two commands", "Your own shards", "Where to read next"],
    "docs/getting-started.md": ["Set-up", "Using it", "Feeding the pruned shards to pretraining"],
    "docs/concepts.md": ["How it runs", "Distributed k-means refinement", "Output layout", "Ranked by prototype distance",
                         "What to use", "One default for any pool"],
    "docs/curation-stages.md": ["Semantic deduplication", "Curation stages compose", "Image-text pools",
                                "Scores only, and the kept set as ids", "Embeddings you already have",
                                "Curating what arrives next"],
    "docs/cluster.md": ["On a cluster", "Ray Jobs, step by step", "Object storage", "Capacity plan"],
    "docs/faults.md": ["Resume and re-running one stage", "Faults: lost nodes"],
    "docs/evaluation.md": ["Does pruning keep accuracy?", "Results on a web-like pool", "What holds it back",
                           "Other label-free groupings", "Results on clean Fashion-MNIST", "The pretraining judge",
                           "SemDeDup's threshold", "Hierarchical k-means", "Earlier runs"],
    "docs/encoders.md": ["A self-supervised encoder of your own", "The shipped encoder", "A CLIP of your own",
                         "The shipped CLIP"],
    "docs/performance.md": ["The driver stays flat", "What a whole run costs beyond embedding", "Embed throughput",
                            "Distributed k-means refinement: the rate against faiss"],
    "docs/extending.md": ["Layout of the code", "Adding a policy", "Adding an embedding backend", "Adding a stage"],
    "docs/python-api.md": ["Python API"],
    "docs/configuration.md": ["Configuration reference", "`ssl-prune run`"],
}


@pytest.mark.parametrize("page", sorted(MAIN_PARTS))
def test_the_docs_keep_their_main_parts(page):
    found = headings(REPO / page)
    lost = [part for part in MAIN_PARTS[page] if not any(h.startswith(part) for h in found)]
    assert not lost, f"{page} lost {lost}"


def test_the_results_tables_are_all_there():
    """The README once held 24 tables (213 rows); they moved to docs/, none may go missing."""
    pages = [p for p in (REPO / "docs").glob("*.md") if p.name != "configuration.md"]
    rows = [line for p in pages for line in p.read_text().splitlines() if line.startswith("|")]
    assert sum(line.startswith("| ---") for line in rows) >= 24
    assert len(rows) >= 213


def test_the_readme_is_a_page_not_a_book():
    assert len((REPO / "README.md").read_text().splitlines()) <= 250


def _toc_slug(text: str) -> str:
    """Python-Markdown's toc anchor (what the mkdocs site uses)."""
    text = re.sub(r"[`*]", "", text)
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text).strip().lower())


def _github_slug(text: str) -> str:
    """GitHub's anchor for the same heading (where the README's links are followed)."""
    text = re.sub(r"[`*]", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_every_relative_link_of_the_readme_lands():
    """The README is not part of the site, so the site's strict build does not check its links: here
    every relative link names a file that exists, and an anchor that both GitHub and the site give."""
    links = [target for target in LINK.findall((REPO / "README.md").read_text()) if "://" not in target]
    assert len(links) >= 10, links
    dead = []
    for target in links:
        path, _, anchor = target.partition("#")
        file = (REPO / path) if path else REPO / "README.md"
        if not file.exists():
            dead.append(f"{target}: no such file")
        elif anchor:
            found = headings(file)
            if anchor not in {_toc_slug(h) for h in found} or anchor not in {_github_slug(h) for h in found}:
                dead.append(f"{target}: no heading with that anchor in {path or 'README.md'}")
    assert not dead, dead


def test_the_readme_keeps_the_two_commands_ci_runs():
    readme = (REPO / "README.md").read_text()
    assert "bash scripts/demo.sh" in readme and "bash scripts/test.sh" in readme
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()
