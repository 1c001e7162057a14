"""The configs and the encoder that come with ssl-prune, found where they are: beside the package in
an installed wheel (pipelines/shipped/, copied there by setup.py), or at the top of a checkout."""

from __future__ import annotations

import os

_HERE = os.path.dirname(os.path.abspath(__file__))
_PLACES = (os.path.join(_HERE, "shipped"), os.path.dirname(_HERE))  # installed wheel, then the checkout


def shipped_dir(folder: str) -> str | None:
    """The shipped `configs` or `models` folder, or None when neither layout has it."""
    return next((os.path.join(p, folder) for p in _PLACES if os.path.isdir(os.path.join(p, folder))), None)


def shipped_configs() -> dict[str, str]:
    """Name -> path of every shipped config (`demo` -> .../configs/demo.yaml)."""
    d = shipped_dir("configs")
    names = sorted(os.listdir(d)) if d else []
    return {n.removesuffix(".yaml"): os.path.join(d, n) for n in names if n.endswith(".yaml")}


def config_path(name_or_path: str) -> str:
    """A config file given by path, or a shipped config given by name (`demo`, `laion`, ...).

    A file of that path wins (a directory of that name does not: `demo/` beside `demo`); a name
    with no file behind it is looked up among the shipped ones.
    """
    if os.path.isfile(name_or_path) or os.sep in name_or_path or name_or_path.endswith((".yaml", ".yml")):
        return name_or_path
    return shipped_configs().get(name_or_path, name_or_path)
