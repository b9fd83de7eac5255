"""YAML + dotted ``key=value`` overrides -> a validated ``RunConfig``.

Errors are ``ConfigError`` with one line per problem, each naming the dotted field; unknown keys
get a did-you-mean from the schema's own field names.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import yaml

from cluster.typed_yaml import apply_override as _apply_override
from cluster.typed_yaml import read_yaml_mapping, validate

from .schema import RunConfig


class ConfigError(ValueError):
    """A config that cannot run; the message names every offending field."""


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = read_yaml_mapping(path, ConfigError)
    return config_from_dict(raw, overrides, source=str(path))


def config_from_dict(raw: dict, overrides: Iterable[str] = (), source: str = "config") -> RunConfig:
    return validate(RunConfig, raw, overrides, source, ConfigError)


def apply_override(data: dict, item: str) -> None:
    """``a.b.c=value``; the value is parsed as YAML (numbers, bools, null, lists)."""
    _apply_override(data, item, ConfigError)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def model_fingerprint(cfg: RunConfig) -> str:
    """Hash of what defines the model's tensors (not layout, not training schedule)."""
    text = json.dumps(cfg.model.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
