"""Picking a backend: by name, for a cluster profile (a submission), or for an existing run.

The one place a backend's name becomes its class (like submitit's ``AutoExecutor``); everything
else asks the backend object (:class:`cluster.backend.Backend`) instead of comparing names.
Backends are imported on first use: the Ray and SLURM clients load only when a run needs them.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.backend import Backend
from cluster.registry import RunRecord, read_record

if TYPE_CHECKING:
    from cluster.profile import ClusterProfile

# name -> "module:class"
BACKEND_CLASSES = {
    "local": "cluster.local:LocalBackend",
    "slurm": "cluster.slurm:SlurmBackend",
    "ray": "cluster.ray_backend:RayBackend",
}
BACKEND_NAMES = tuple(BACKEND_CLASSES)


def backend_class(name: str) -> type[Backend]:
    """The Backend class called ``name``; ValueError naming the allowed values otherwise."""
    if name not in BACKEND_CLASSES:
        raise ValueError(f"unknown backend {name!r}: allowed values are {', '.join(BACKEND_NAMES)}")
    module, cls = BACKEND_CLASSES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get_backend(name: str, **options: Any) -> Backend:
    """A backend instance for ``name``; ``options`` go to its constructor."""
    return backend_class(name)(**options)


def backend_for_profile(profile: ClusterProfile) -> Backend:
    """Where a submission goes: the profile's ``backend``, configured by its section."""
    return backend_class(profile.backend).from_profile(profile)


def backend_for_run(run_dir: Path | str, record: RunRecord | None = None) -> Backend:
    """The backend of an existing run (``state.json``'s ``backend``), set up as the run was
    submitted, to :meth:`~Backend.refresh`, ask the :meth:`~Backend.scheduler_state` of, or
    cancel it. ``record``: the run's record when the caller has read it already."""
    record = read_record(run_dir) if record is None else record
    return backend_class(record.backend).for_run(Path(run_dir))
