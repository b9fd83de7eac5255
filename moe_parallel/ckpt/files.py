"""Durable small-file writes for checkpoint bookkeeping."""

from __future__ import annotations

import os
from pathlib import Path


def write_durable(path: Path, text: str) -> None:
    """Write and fsync, so that a rename that follows never publishes an empty file."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def replace_file(path: Path, text: str) -> None:
    """Atomically replace ``path``: readers see the old or the new content, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    write_durable(tmp, text)
    os.replace(tmp, path)
