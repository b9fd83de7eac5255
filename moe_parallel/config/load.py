"""YAML + dotted ``key=value`` overrides -> a validated ``RunConfig``.

Errors are ``ConfigError`` with one line per problem, each naming the dotted field; unknown keys
get a did-you-mean from the schema's own field names.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ValidationError

from .schema import RunConfig


class ConfigError(ValueError):
    """A config that cannot run; the message names every offending field."""


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return config_from_dict(raw, overrides, source=str(path))


def config_from_dict(raw: dict, overrides: Iterable[str] = (), source: str = "config") -> RunConfig:
    data = json.loads(json.dumps(raw))  # deep copy, plain types
    for item in overrides:
        apply_override(data, item)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid config\n" + _explain(exc)) from None


def apply_override(data: dict, item: str) -> None:
    """``a.b.c=value``; the value is parsed as YAML (numbers, bools, null, lists)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.steps=10)")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: empty name in dotted key {key!r}")
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
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key{_did_you_mean(err['loc'])}")
        elif err["type"] == "value_error":
            msg = str(err.get("ctx", {}).get("error", err["msg"]))
            lines.append(f"  {where + ': ' if where else ''}{msg}")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {where}: {err['msg']}{shown}")
    return "\n".join(lines)


def _did_you_mean(loc: tuple) -> str:
    model: type[BaseModel] | None = RunConfig
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


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def model_fingerprint(cfg: RunConfig) -> str:
    """Hash of what defines the model's tensors (not layout, not training schedule)."""
    text = json.dumps(cfg.model.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
