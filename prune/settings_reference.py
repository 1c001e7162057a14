"""The configuration reference, generated from the settings models: every key a config takes, with
its type, default and description, as Markdown (docs/configuration.md; `ssl-prune config-reference`).

Descriptions come from the models themselves: a field's `description=`, else the comments written
beside it in its class (the line's own comment and the comment lines directly above it), else, for
a section, its model's docstring. A key with none of them is an error naming it, so a new setting
cannot reach the reference undescribed. Pure: models in, text out; the verbs' configs are the CLI's.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import re
import textwrap
import tokenize
import types
import typing
from typing import Any, Literal, Optional, Union

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from prune.settings import Fingerprinted

_BOUNDS = ((Ge, "ge", "≥"), (Gt, "gt", ">"), (Le, "le", "≤"), (Lt, "lt", "<"),
           (MinLen, "min_length", "length ≥"), (MaxLen, "max_length", "length ≤"))


@dataclasses.dataclass(frozen=True)
class Key:
    """One row of the reference."""

    path: str  # dotted, as an override names it: select.keep_fraction
    type: str
    default: str
    description: str
    section: Optional[str] = None  # the anchor of the section this key opens, if it is one


@dataclasses.dataclass
class Block:
    """A section's table: its keys, under a heading."""

    path: str  # dotted path of the section ("" for the config's top level)
    heading: str
    anchor: str
    description: str
    keys: list[Key]


class MissingDescriptions(ValueError):
    """Keys with no description anywhere; the message names each."""


# ----- reading the models ---------------------------------------------------------------------


def _comment_lines(src: str) -> dict[int, tuple[str, bool]]:
    """Line number -> (comment text, whether the comment is the whole line)."""
    lines = src.splitlines()
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            out[row] = (tok.string.lstrip("#").strip(), lines[row - 1].lstrip().startswith("#"))
    return out


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comments written beside it in `cls`'s own source ("" where none)."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # made at run time (create_model), or no source
        return {}
    classdef = ast.parse(src).body[0]
    comments = _comment_lines(src)
    out = {}
    for node in classdef.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, row = [], node.lineno - 1
        while row in comments and comments[row][1]:
            above.insert(0, comments[row][0])
            row -= 1
        trailing = [comments[r][0] for r in range(node.lineno, node.end_lineno + 1)
                    if r in comments and not comments[r][1]]
        out[node.target.id] = " ".join(text for text in above + trailing if text)
    return out


def _defining_class(model: type, name: str) -> Optional[type]:
    for cls in model.__mro__:
        if name in cls.__dict__.get("__annotations__", {}):
            return cls
    return None


def _docstring(model: type) -> str:
    """The model's own docstring, as one paragraph ("" when it has none)."""
    doc = model.__dict__.get("__doc__")
    if not doc:
        for base in model.__mro__[1:]:  # a model made by create_model keeps its base's
            if base.__module__.startswith("pydantic"):
                break
            if base.__dict__.get("__doc__") and base.__name__ == model.__name__:
                doc = base.__dict__["__doc__"]
                break
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split()) if doc else ""


def _unwrap(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _section_model(annotation: Any) -> Optional[type]:
    """The settings model a field holds (itself, or inside Optional), else None."""
    annotation = _unwrap(annotation)
    if _is_model(annotation):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType):
        models = [a for a in map(_unwrap, typing.get_args(annotation)) if _is_model(a)]
        rest = [a for a in typing.get_args(annotation) if a is not type(None) and not _is_model(_unwrap(a))]
        if len(models) == 1 and not rest:
            return models[0]
    return None


def _nested_models(annotation: Any) -> list[tuple[str, type]]:
    """Settings models held in containers or unions: (path suffix, model), e.g. ("[]", Item)."""
    annotation = _unwrap(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, tuple, set, frozenset):
        return [("[]", a) for a in map(_unwrap, args) if _is_model(a)]
    if origin is dict and len(args) == 2 and _is_model(_unwrap(args[1])):
        return [(".<name>", _unwrap(args[1]))]
    if origin in (Union, types.UnionType):
        models = [a for a in map(_unwrap, args) if _is_model(a)]
        return [("", m) for m in models] if len(models) > 1 else []
    return []


def type_text(annotation: Any) -> str:
    """A type as a reader of a YAML config wants it: `int or null`, one of `a`, `b`, list of str."""
    annotation = _unwrap(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        values = ", ".join(f"`{a if isinstance(a, str) else json.dumps(a)}`" for a in args)
        return ("one of " if len(args) > 1 else "") + values
    if origin in (Union, types.UnionType):
        parts = [type_text(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin in (list, set, frozenset):
        return f"list of {type_text(args[0])}" if args else "list"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_text(args[0])}"
        return "[" + ", ".join(type_text(a) for a in args) + "]"
    if origin is dict:
        return f"mapping of {type_text(args[0])} to {type_text(args[1])}" if args else "mapping"
    if _is_model(annotation):
        return "section"
    if annotation is dict:
        return "mapping"
    if annotation is list:
        return "list"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(info) -> str:
    """The field's numeric and length bounds: ` (≥ 1, ≤ 100)`, or ""."""
    found = []
    for mark in info.metadata:
        for kind, attr, symbol in _BOUNDS:
            if isinstance(mark, kind):
                found.append(f"{symbol} {getattr(mark, attr):g}" if isinstance(getattr(mark, attr), float)
                             else f"{symbol} {getattr(mark, attr)}")
    return f" ({', '.join(found)})" if found else ""


def _is_placement(info) -> bool:
    return any(isinstance(m, Fingerprinted) and not m.counts for m in info.metadata)


def _default_text(value: Any) -> str:
    if value is PydanticUndefined or value is Ellipsis:
        return "required"
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _dumped(model: type, default: Any) -> Optional[dict]:
    """The section's default as its config would read it (None: it has no default)."""
    if isinstance(default, BaseModel):
        return default.model_dump(mode="json")
    if default is None or default is PydanticUndefined or default is Ellipsis:
        return None
    return model.model_validate(default).model_dump(mode="json")


# ----- the blocks -----------------------------------------------------------------------------


def blocks(model: type, title: str = "", seen: Optional[dict] = None, slugs: Optional[set] = None) -> list[Block]:
    """Every section of a config model, depth first: the top level's keys, then each section's.

    `seen` maps (model, dumped default) to the anchor of a block already written, so a section two
    verbs share (the same model with the same defaults) is described once and linked after that;
    `slugs` holds the anchors already taken in the page. `title` tells this verb's headings apart.
    """
    out: list[Block] = []
    missing: list[str] = []
    _walk(model, None, Block("", "", "", "", []), title, {} if seen is None else seen,
          set() if slugs is None else slugs, out, missing)
    if missing:
        raise MissingDescriptions("settings without a description (write a comment beside the field, or "
                                  "Field(description=...)): " + ", ".join(missing))
    return out


def _walk(model: type, default: Optional[dict], block: Block, title: str, seen: dict, slugs: set,
          out: list[Block], missing: list[str]) -> None:
    """Fill `block` with `model`'s keys (values from `default`, else the fields' own defaults),
    append it to `out`, then the blocks of its sections."""
    out.append(block)
    comments: dict[type, dict[str, str]] = {}
    children = []
    for name, info in model.model_fields.items():
        owner = _defining_class(model, name) or model
        if owner not in comments:
            comments[owner] = field_comments(owner)
        key = f"{block.path}.{name}" if block.path else name
        value = default.get(name, PydanticUndefined) if default is not None else _field_default(info)
        text = info.description or comments[owner].get(name, "")
        section = _section_model(info.annotation)
        if section is not None:
            sub_default = _dumped(section, value)
            text = " ".join(t for t in (_docstring(section), _sentence(text) if _docstring(section) else text) if t)
            identity = (section, json.dumps(sub_default, sort_keys=True))
            if identity not in seen:
                heading = f"`{key}`" + (f" ({title})" if title else "")
                seen[identity] = unique_slug(heading, slugs)
                children.append((section, sub_default, Block(key, heading, seen[identity], text, [])))
            block.keys.append(Key(key, "section" + (" or null" if _nullable(info.annotation) else ""),
                                  "its keys' defaults" if sub_default is not None else _default_text(value),
                                  text, section=seen[identity]))
        else:
            for suffix, item in _nested_models(info.annotation):
                heading = f"`{key}{suffix}`" + (f" ({title})" if title else "")
                children.append((item, None, Block(key + suffix, heading, unique_slug(heading, slugs),
                                                   _docstring(item), [])))
            if isinstance(value, BaseModel):
                value = value.model_dump(mode="json")
            placement = " *Placement only: changing it re-runs nothing.*" if text and _is_placement(info) else ""
            block.keys.append(Key(key, type_text(info.annotation) + _bounds(info), _default_text(value),
                                  text + placement))
        if not text:
            missing.append(f"{key} ({owner.__name__}.{name})")
    for section, sub_default, child in children:
        _walk(section, sub_default, child, title, seen, slugs, out, missing)


def _sentence(text: str) -> str:
    """A comment as a sentence that can follow a docstring's: capitalized, with a full stop."""
    if not text:
        return text
    if not text.split()[0].isalpha():  # a name (open_clip's, `key`): left as written
        return text + ("" if text.endswith((".", "!", "?")) else ".")
    return text[0].upper() + text[1:] + ("" if text.endswith((".", "!", "?")) else ".")


def _field_default(info) -> Any:
    if info.default_factory is not None:
        return info.default_factory()
    return info.default


def _nullable(annotation: Any) -> bool:
    annotation = _unwrap(annotation)
    return typing.get_origin(annotation) in (Union, types.UnionType) and type(None) in typing.get_args(annotation)


def unique_slug(heading: str, used: set) -> str:
    """The anchor Python-Markdown's toc gives a heading (its slugify, then _1, _2 for repeats)."""
    text = re.sub(r"[`*]", "", heading)
    slug = re.sub(r"[^\w\s-]", "", text).strip().lower()
    slug = re.sub(r"[-\s]+", "-", slug)
    candidate, n = slug, 0
    while candidate in used:
        n += 1
        candidate = f"{slug}_{n}"
    used.add(candidate)
    return candidate


# ----- Markdown -------------------------------------------------------------------------------


def _cell(text: str) -> str:
    """Table-safe Markdown: pipes escaped; outside code, `<name>` shown as text (not eaten as HTML)
    and Python's None as the null a YAML config writes."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # outside code spans
        parts[i] = re.sub(r"\bNone\b", "null", parts[i].replace("<", "&lt;"))
    return "`".join(parts).replace("|", "\\|").replace("\n", " ")


def _table(keys: list[Key]) -> list[str]:
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for k in keys:
        kind = f"[section](#{k.section})" if k.section else _cell(k.type)
        rows.append(f"| `{k.path}` | {kind} | {_cell(k.default)} | {_cell(k.description)} |")
    return rows


def reference_markdown(verbs: list[tuple[str, str, type]], preamble: str = "") -> str:
    """The reference: for each (verb, what it does, its config model), a table of its top-level keys,
    then one table per section; a section an earlier verb described the same way is linked."""
    seen: dict = {}
    slugs: set = set()
    lines = ["# Configuration reference", ""]
    if preamble:
        lines += [preamble.strip(), ""]
    for verb, what, model in verbs:
        heading = f"`ssl-prune {verb}`"
        unique_slug(heading, slugs)
        lines += [f"## {heading}", "", what.strip(), ""]
        title = "" if verb == verbs[0][0] else verb
        for block in blocks(model, title, seen, slugs):
            if block.path:
                lines += [f"### {block.heading}", ""]
                if block.description:
                    lines += [_cell(block.description), ""]
            if block.keys:
                lines += _table(block.keys) + [""]
    return "\n".join(lines).rstrip() + "\n"


def every_key(model: type, path: str = "") -> list[str]:
    """Every dotted key of a config model, sections and the keys inside them (for checks)."""
    out = []
    for name, info in model.model_fields.items():
        key = f"{path}.{name}" if path else name
        out.append(key)
        section = _section_model(info.annotation)
        if section is not None:
            out += every_key(section, key)
        for suffix, item in _nested_models(info.annotation):
            out += every_key(item, key + suffix)
    return out
