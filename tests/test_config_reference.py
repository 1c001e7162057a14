"""docs/configuration.md is generated from the settings models (`ssl-prune config-reference`): it is
current, it names every key, and every key has a type, a default and a description."""

from __future__ import annotations

import difflib
import pathlib
import re
import subprocess
import sys
from typing import Annotated, Literal, Optional

import pytest
from pydantic import Field

from prune.settings import PLACEMENT, Section
from prune.settings_reference import (
    MissingDescriptions,
    blocks,
    every_key,
    field_comments,
    reference_markdown,
    type_text,
    unique_slug,
)

REPO = pathlib.Path(__file__).resolve().parent.parent
CHECKED_IN = REPO / "docs" / "configuration.md"


@pytest.fixture(scope="module")
def generated() -> str:
    from pipelines.cli.reference import reference_text

    return reference_text()


def test_the_checked_in_reference_is_current(generated):
    current = CHECKED_IN.read_text()
    diff = "\n".join(difflib.unified_diff(current.splitlines(), generated.splitlines(), "checked in", "generated",
                                         lineterm=""))
    assert current == generated, ("docs/configuration.md is stale; regenerate it with "
                                  f"`ssl-prune config-reference --output docs/configuration.md`:\n{diff}")


def _rows(text: str) -> dict[str, list[str]]:
    """key -> its row's cells (type, default, description), from every table of the reference."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows.setdefault(cells[0].strip("`"), cells[1:])
    return rows


def _sections(text: str) -> dict[str, str]:
    """anchor -> the dotted path of the section under that heading, as the site anchors them."""
    used, out = set(), {}
    for line in text.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip()
            anchor = unique_slug(title, used)
            if line.startswith("### `"):
                out[anchor] = title.split("`")[1]
    return out


def _documented(key: str, rows: dict, sections: dict) -> bool:
    """A row of its own, or a row of a section another verb shares: `evaluate.dedup` links to
    run's `dedup`, where `dedup.eps` stands for `evaluate.dedup.eps`."""
    if key in rows:
        return True
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        link = re.search(r"\[section\]\(#([^)]+)\)", (rows.get(prefix) or [""])[0])
        if link and link.group(1) in sections:
            return _documented(".".join([sections[link.group(1)], *parts[i:]]), rows, sections)
    return False


def test_every_key_of_every_verb_is_there_with_a_type_default_and_description(generated):
    from pipelines.cli.reference import verbs

    rows, sections = _rows(generated), _sections(generated)
    for verb, _, model in verbs():
        keys = every_key(model)
        assert keys, verb
        missing = [key for key in keys if not _documented(key, rows, sections)]
        assert not missing, f"{verb}: keys not in the reference: {missing}"
    for key, (kind, default, description) in rows.items():
        assert kind and default and description.strip(), f"{key}: {kind!r} {default!r} {description!r}"


def test_every_run_key_is_there(generated):
    from pipelines.cli.config import RunConfig, run_config_model

    rows = _rows(generated)
    keys = every_key(run_config_model(shipped_only=True))
    assert set(every_key(RunConfig)) <= set(keys)
    # the sections every shipped stage brings, and the keys a user reaches for first
    for key in ("input", "output", "stages", "embed.backend", "embed.pretrained", "kmeans.k", "kmeans.refine_iters",
                "dedup.eps", "select.keep_fraction", "select.policy", "write.samples_per_shard", "export.id_col",
                "clip_score.keep_top_fraction", "filter.min_image_side", "import_embeddings.path"):
        assert key in keys and key in rows, key
    assert [k for k in keys if k not in rows] == []


def test_the_reference_shows_defaults_as_a_config_writes_them(generated):
    rows = _rows(generated)
    assert rows["select.keep_fraction"][:2] == ["float (> 0, ≤ 1)", "`0.7`"]
    assert rows["stages"][1] == '`["embed", "prototypes", "assign", "select", "write"]`'
    assert rows["output"][1] == "required"
    assert rows["kmeans.k"][0].startswith("int or null")
    assert rows["write.copy_from"][0] == "one of `auto`, `input`, `staged`"
    assert "Placement only" in rows["write.copy_from"][2] and "Placement only" not in rows["write.band_step"][2]
    # a stage's section with the default the stage gives it, not the model's own
    assert rows["clip_score.keep_top_fraction"][1] == "`0.3`"


class _Item(Section):
    """One item of a list."""

    name: str = "x"  # the item's name


class _Inner(Section):
    """The inner section."""

    # a comment above,
    # over two lines
    depth: int = Field(3, ge=1)  # and one on the line
    mode: Literal["a", "b"] = "a"  # a or b


class _Toy(Section):
    """A toy config."""

    inner: _Inner = _Inner()  # where the inner things go
    items: list[_Item] = []  # any number of items
    threads: Annotated[Optional[int], PLACEMENT] = Field(None, ge=1, description="threads, from Field")


def test_descriptions_come_from_fields_comments_and_docstrings():
    assert field_comments(_Inner) == {"depth": "a comment above, over two lines and one on the line", "mode": "a or b"}
    text = reference_markdown([("toy", "A toy verb.", _Toy)])
    rows = _rows(text)
    assert rows["inner"][2] == "The inner section. Where the inner things go."
    assert rows["inner.depth"] == ["int (≥ 1)", "`3`", "a comment above, over two lines and one on the line"]
    assert rows["inner.mode"][0] == "one of `a`, `b`"
    assert rows["items"][0] == "list of section" and rows["items[].name"][2] == "the item's name"
    assert rows["threads"][0] == "int or null (≥ 1)"
    assert rows["threads"][2] == "threads, from Field *Placement only: changing it re-runs nothing.*"
    assert [b.path for b in blocks(_Toy)] == ["", "inner", "items[]"]
    assert "### `inner`" in text and "[section](#inner)" in text


def test_a_key_without_a_description_stops_the_generator_naming_it():
    class Bare(Section):
        documented: int = 1  # says what it is
        bare: int = 2

    with pytest.raises(MissingDescriptions, match=r"bare \(Bare\.bare\)"):
        reference_markdown([("bare", "", Bare)])


def test_type_text():
    assert type_text(Optional[list[str]]) == "list of str or null"
    assert type_text(tuple[float, float]) == "[float, float]"
    assert type_text(Literal["auto"] | bool) == "`auto` or bool"
    assert type_text(dict) == "mapping"


def test_check_exits_1_naming_the_stale_lines(tmp_path):
    stale = tmp_path / "configuration.md"
    stale.write_text(CHECKED_IN.read_text().replace("| `select.keep_fraction` |", "| `select.keep_fractoin` |"))
    cli = [sys.executable, "-m", "pipelines.cli", "config-reference", "--check", "--output"]
    res = subprocess.run(cli + [str(stale)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "-| `select.keep_fractoin` |" in res.stdout and "+| `select.keep_fraction` |" in res.stdout
    assert "is stale" in res.stdout and "config-reference --output" in res.stdout


def test_check_passes_on_a_current_file_and_output_writes_one(tmp_path, capsys, generated):
    from pipelines.cli.reference import config_reference

    written = tmp_path / "docs" / "configuration.md"
    assert config_reference(str(written), check=False) == 0
    assert written.read_text() == generated
    assert config_reference(str(written), check=True) == 0
    assert "up to date" in capsys.readouterr().out
    assert config_reference(str(tmp_path / "missing.md"), check=True) == 1
