"""No product module reaches into another module's private names (``_x``).

A name with a leading underscore is free to change with its module; code elsewhere that imports
it (``from m import _x``) or reads it through the module (``m._x``) breaks silently when it does.
What another module needs is public, or it moves.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PRODUCT = ("moe_parallel", "cluster", "launch")
OURS = PRODUCT


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")[: None if is_package else -1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def private_uses(path: Path) -> list[str]:
    """``from ours import _x`` and ``module_alias._x`` for modules of ours, in one file."""
    module, is_package = _module_name(path), path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    aliases: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _absolute(module, is_package, node)
            if source.split(".")[0] not in OURS:
                continue
            for name in node.names:
                if name.name.startswith("_") and not name.name.startswith("__"):
                    found.append(
                        f"{path.relative_to(REPO)}:{node.lineno} imports {source}.{name.name}"
                    )
                aliases.add(name.asname or name.name)  # may be a module: checked below
        elif isinstance(node, ast.Import):
            for name in node.names:
                if name.name.split(".")[0] in OURS:
                    aliases.add(name.asname or name.name.split(".")[0])
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(
                f"{path.relative_to(REPO)}:{node.lineno} reads {node.value.id}.{node.attr}"
            )
    return found


def product_files() -> list[Path]:
    files = []
    for top in PRODUCT:
        files += sorted((REPO / top).rglob("*.py"))
    return [f for f in files if "testbed" not in f.parts]


def test_no_product_module_uses_another_modules_private_names():
    found = [use for path in product_files() for use in private_uses(path)]
    assert found == []


def test_the_check_sees_both_kinds_of_use(tmp_path, monkeypatch):
    # The check itself must be able to fail: a file with both kinds of use, inside the repo.
    probe = REPO / "moe_parallel" / "_private_probe_for_test.py"
    probe.write_text(
        "from moe_parallel.runtime.faults import _matches\n"
        "from moe_parallel.runtime import faults\n"
        "x = faults._hang_armed\n"
    )
    try:
        found = private_uses(probe)
    finally:
        probe.unlink()
    assert [f.split(" ", 1)[1] for f in found] == [
        "imports moe_parallel.runtime.faults._matches",
        "reads faults._hang_armed",
    ]
