"""``moectl ckpt verify|inspect``: check a checkpoint's bytes and show what it holds."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .checkpoint import META, resolve_checkpoint
from .manifest import read_manifest, verify


def verify_command(target: str, step: int | None) -> int:
    path = resolve_checkpoint(Path(target), step)
    problems = verify(path)
    if problems:
        print(f"FAILED {path}: {len(problems)} problem(s)")
        for p in problems:
            print(f"  {p}")
        return 1
    manifest = read_manifest(path)
    print(
        f"OK {path}: {len(manifest['tensors'])} tensors, {len(manifest['chunks'])} chunks verified"
    )
    return 0


def inspect_command(target: str, step: int | None, show_all: bool) -> int:
    path = resolve_checkpoint(Path(target), step)
    meta = json.loads((path / META).read_text())
    manifest = read_manifest(path)
    console = Console()
    console.print(f"[bold]{path}[/bold]")
    console.print(
        f"step {meta['step']}, consumed samples {meta['consumed_samples']}, "
        f"model fingerprint {meta['model_fingerprint']}"
    )
    console.print(f"layout {meta['layout']}")
    size = sum(manifest["chunk_file_sizes"].values())
    console.print(f"{len(manifest['tensors'])} tensors, {size / 2**20:.1f} MiB in shards")
    table = Table("tensor", "global shape", "dtype")
    names = sorted(manifest["tensors"])
    shown = names if show_all else [n for n in names if not n.startswith("optimizer.")]
    for name in shown:
        t = manifest["tensors"][name]
        table.add_row(name, "x".join(map(str, t["shape"])), t["dtype"].replace("torch.", ""))
    console.print(table)
    if not show_all:
        console.print(f"({len(names) - len(shown)} optimizer tensors hidden; --all shows them)")
    return 0
