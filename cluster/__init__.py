"""cluster: turns a run into ranks with a torch.distributed environment.

It knows runs and ranks, never models, and imports nothing from ``moe_parallel``.  A
:class:`Backend` (local, SLURM, Ray; chosen in :mod:`cluster.backends`) starts ``world_size``
copies of a program, supervises them (with the hang watchdog, :mod:`cluster.watchdog`), and
records the outcome in the run directory's ``state.json``.
"""

from cluster.backend import Backend, RunHandle, RunSpec
from cluster.backends import BACKEND_NAMES, backend_for_profile, backend_for_run, get_backend
from cluster.env import RankEnv, RankEnvError, free_port, rank_env, read_rank_env
from cluster.local import LaunchError, LocalBackend, run_local
from cluster.registry import (
    RankFailure,
    Restart,
    RunEntry,
    RunLayout,
    RunRecord,
    list_runs,
    new_run_dir,
    read_record,
    runs_root,
    write_record,
)
from cluster.state import RunState

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "LaunchError",
    "LocalBackend",
    "RankEnv",
    "RankEnvError",
    "RankFailure",
    "Restart",
    "RunEntry",
    "RunHandle",
    "RunLayout",
    "RunRecord",
    "RunSpec",
    "RunState",
    "backend_for_profile",
    "backend_for_run",
    "free_port",
    "get_backend",
    "list_runs",
    "new_run_dir",
    "rank_env",
    "read_rank_env",
    "read_record",
    "run_local",
    "runs_root",
    "write_record",
]
