"""YAML + dotted ``key=value`` overrides -> a validated pydantic model, with errors that name
each offending field (and a did-you-mean for unknown keys).

Shared by run configs (:mod:`moe_parallel.config`) and cluster profiles (:mod:`cluster.profile`).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class TypedYamlError(ValueError):
    """A file or override that does not validate; the message names every offending field."""


def read_yaml_mapping(path: str | Path, error: type[ValueError] = TypedYamlError) -> dict:
    path = Path(path)
    if not path.is_file():
        raise error(f"file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: the top level must be a mapping")
    return raw


def validate(
    model: type[M],
    raw: dict,
    overrides: Iterable[str] = (),
    source: str = "config",
    error: type[ValueError] = TypedYamlError,
    what: str = "config",
) -> M:
    data = json.loads(json.dumps(raw))  # deep copy, plain types
    for item in overrides:
        apply_override(data, item, error)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(f"{source}: invalid {what}\n" + explain(exc, model)) from None


def apply_override(data: dict, item: str, error: type[ValueError] = TypedYamlError) -> None:
    """``a.b.c=value``; the value is parsed as YAML (numbers, bools, null, lists)."""
    if "=" not in item:
        raise error(f"override {item!r} is not of the form key=value (e.g. train.steps=10)")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise error(f"override {item!r}: empty name in dotted key {key!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise error(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def explain(exc: ValidationError, root: type[BaseModel]) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key{_did_you_mean(root, err['loc'])}")
        elif err["type"] == "value_error":
            msg = str(err.get("ctx", {}).get("error", err["msg"]))
            lines.append(f"  {where + ': ' if where else ''}{msg}")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {where}: {err['msg']}{shown}")
    return "\n".join(lines)


def _did_you_mean(root: type[BaseModel], loc: tuple) -> str:
    model: type[BaseModel] | None = root
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if model else None
        model = _model_of(field.annotation) if field else None
    if model is None:
        return ""
    names = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
    allowed = ", ".join(names)
    return (f"; did you mean {close[0]!r}?" if close else "") + f" (allowed: {allowed})"


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
        if found:
            return found
    return None
