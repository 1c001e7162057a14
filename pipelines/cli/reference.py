"""`ssl-prune config-reference`: docs/configuration.md, generated from the verbs' config models.

    ssl-prune config-reference                                  # print it
    ssl-prune config-reference --output docs/configuration.md   # write it
    ssl-prune config-reference --check                          # exit 1 naming the lines that differ
"""

from __future__ import annotations

import difflib
import os

from prune.settings_reference import reference_markdown

DEFAULT_PATH = os.path.join("docs", "configuration.md")
REGENERATE = f"ssl-prune config-reference --output {DEFAULT_PATH}"

PREAMBLE = f"""
<!-- Generated from the settings models by `{REGENERATE}`; do not edit by hand.
`ssl-prune config-reference --check` and tests/test_config_reference.py fail when it is stale. -->

Every key each verb's config takes: its type, its default and what it does. A config is a YAML
file (or the name of a shipped one: `demo`, `laion`, ...) plus dotted `key=value` overrides on the
command line (`select.keep_fraction=0.5`, `'stages=[embed,prototypes,assign,select,write]'`); an
unknown key or a bad value is one error naming it before any work starts, and `--print-config`
prints the resolved config. A key marked *placement only* decides where and how work runs, never
what it produces, so changing it re-runs nothing ([Faults and resume](faults.md#resume-and-re-running-one-stage));
every other key is part of the fingerprint of the stages that read it. What the keys do together:
[Getting started](getting-started.md#using-it), [Concepts](concepts.md) and [Curation
stages](curation-stages.md).

This page is generated from the settings models (each section's model lives beside the code it
configures, e.g. `prune/select/settings.py`; the verbs' configs are in `pipelines/cli/config.py`).
"""


def verbs() -> list[tuple[str, str, type]]:
    """(verb, what its config is, its model) for every verb that reads a config, `run` first."""
    from .config import EvaluateConfig, TrainClipConfig, TrainEncoderConfig, run_config_model

    return [
        ("run", "Prune shards: the stages listed in `stages`, each configured by its section. The sections of "
                "stages the default list leaves out (`export`, `clip_score`, `filter`, `import_embeddings`) are "
                "read only when `stages` names them.", run_config_model(shipped_only=True)),
        ("evaluate", "Train classifiers on each policy's kept subset of a labeled pool "
                     "([Evaluation](evaluation.md)). Sections it shares with `run` link there.", EvaluateConfig),
        ("train-encoder", "Train a self-supervised encoder (SimCLR) on unlabeled shards "
                          "([Encoders](encoders.md)).", TrainEncoderConfig),
        ("train-clip", "Train a small CLIP on image-caption shards ([Encoders](encoders.md)).", TrainClipConfig),
    ]


def reference_text() -> str:
    return reference_markdown(verbs(), PREAMBLE)


def stale_lines(path: str, text: str) -> list[str]:
    """The unified diff from the file at `path` to `text` (empty: it is up to date)."""
    try:
        with open(path, encoding="utf-8") as f:
            current = f.read()
    except FileNotFoundError:
        return [f"{path} does not exist"]
    if current == text:
        return []
    return list(difflib.unified_diff(current.splitlines(), text.splitlines(), fromfile=f"{path} (checked in)",
                                     tofile=f"{path} (generated)", lineterm=""))


def config_reference(output: str | None, check: bool) -> int:
    """The verb: print the reference, write it to `output`, or (`check`) compare `output` with it."""
    text = reference_text()
    if check:
        path = output or DEFAULT_PATH
        diff = stale_lines(path, text)
        if diff:
            print("\n".join(diff))
            print(f"ssl-prune: {path} is stale: it differs from the settings models in the lines above; "
                  f"regenerate it with `ssl-prune config-reference --output {path}`")
            return 1
        print(f"ssl-prune: {path} is up to date")
        return 0
    if output is None:
        print(text, end="")
        return 0
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"ssl-prune: wrote {output}")
    return 0
