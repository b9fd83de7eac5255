"""Picking a backend by name (what a config's ``cluster.backend`` or ``moectl --backend`` says)."""

from __future__ import annotations

from typing import Any

from cluster.backend import Backend

BACKEND_NAMES = ("local", "slurm", "ray")


def get_backend(name: str, **options: Any) -> Backend:
    """A backend instance for ``name``; ``options`` go to its constructor."""
    if name == "local":
        from cluster.local import LocalBackend

        return LocalBackend(**options)
    if name == "slurm":
        from cluster.slurm import SlurmBackend

        return SlurmBackend(**options)
    if name == "ray":
        from cluster.ray_backend import RayBackend

        return RayBackend(**options)
    raise ValueError(f"unknown backend {name!r}: allowed values are {', '.join(BACKEND_NAMES)}")
