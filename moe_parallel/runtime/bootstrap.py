"""The one start-up of a rank process: every entry point and every test rank program calls it.

Order matters: the warning filters and, on CPU, ``MOE_PARALLEL_DEVICE=cpu`` and the CPU adapter
must be in place before Megatron-core is first imported (the import hook in
:mod:`.megatron_import` reads the variable to leave Megatron's fusions uncompiled on CPU), so
Megatron is imported here only after :func:`prepare_process`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

import torch

from . import cpu_adapter
from .quiet import quiet_expected_warnings

if TYPE_CHECKING:
    from moe_parallel.config import RunConfig

    from .distributed import RankInfo


# What a CPU rank imports anyway (preload_cpu.py): the local backend's fork server imports it once
# and forks the ranks from there (cluster/forkserver.py).
CPU_RANK_PRELOAD = ("moe_parallel.runtime.preload_cpu",)


def local_rank_preload(device: str = "auto") -> tuple[str, ...]:
    """``RunSpec.preload`` for ranks started on this machine: the CPU preload when they run on
    CPU (``device`` 'cpu', or any choice on a machine without a GPU), nothing for GPU ranks (a
    forked process cannot use a CUDA driver its parent initialised). SLURM and Ray ranks start
    on their nodes and ignore it."""
    on_cpu = device == "cpu" or not torch.cuda.is_available()
    return CPU_RANK_PRELOAD if on_cpu else ()


def machine_device() -> str:
    """'cpu' when this process has no usable GPU or ``MOE_PARALLEL_DEVICE=cpu``, else 'cuda'."""
    return "cpu" if cpu_adapter.cpu_mode_requested() else "cuda"


def prepare_process(device: str) -> None:
    """What must precede Megatron's import (idempotent): the warning filters and, on CPU, the
    device variable, the CPU adapter and the intra-op thread count (``OMP_NUM_THREADS``, 1 by
    default: the backends start one rank per core)."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: allowed values are 'cpu' or 'cuda'")
    quiet_expected_warnings()
    if device == "cpu":
        os.environ["MOE_PARALLEL_DEVICE"] = "cpu"
        cpu_adapter.activate()
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        _forks_use_one_thread()


_FORK_HOOK = []


def _forks_use_one_thread() -> None:
    """A process forked from a CPU rank (the async checkpoint writer) runs its tensor ops on one
    thread. Why: the rank's OpenMP pool does not survive a fork, and a forked child entering a
    parallel region with more than one thread waits forever for the pool's threads (seen: a
    one-rank run with 2 threads and ``checkpoint.async_save`` hung in the writer's first copy).
    Registered once per process."""
    if not _FORK_HOOK:
        os.register_at_fork(after_in_child=lambda: torch.set_num_threads(1))
        _FORK_HOOK.append(True)


def start_rank(
    cfg: RunConfig,
    device: str | None = None,
    before_process_group: Callable[[str], object] | None = None,
) -> RankInfo:
    """Prepare this process and join the job's process group and Megatron's groups.

    ``device``: None takes the config's choice for this machine (``train.device``, refused with
    its reason when it cannot run here). ``before_process_group(device)`` runs between the two,
    e.g. to start the rank's heartbeat monitor so that a hang in the rendezvous is seen."""
    from moe_parallel.config import resolve_device

    if device is None:
        device = resolve_device(cfg, torch.cuda.is_available() and cfg.train.device != "cpu")
    prepare_process(device)
    if before_process_group is not None:
        before_process_group(device)
    from .distributed import init_distributed  # Megatron: after prepare_process

    return init_distributed(cfg, device)


def stop_rank() -> None:
    """Leave Megatron's groups and the process group (a no-op when never joined)."""
    from .distributed import shutdown_distributed

    shutdown_distributed()
