"""The torch.distributed environment of a rank (torchrun's variable names).

Launchers call :func:`rank_env` to build each rank's variables; ranks call
:func:`read_rank_env` to read them back, with ``init_method="env://"``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

RUN_DIR_ENV = "MOE_PARALLEL_RUN_DIR"

# A rank exits with this code after it saved a checkpoint because a signal asked it to stop
# (preemption, time limit): the run is healthy and may be requeued. 75 is sysexits' EX_TEMPFAIL.
EXIT_REQUEUE = 75

# Set on every rank of an elastic run (cluster/elastic.py): this attempt's data-parallel size.
DATA_PARALLEL_ENV = "MOE_PARALLEL_DATA_PARALLEL"

RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
OWNED_VARS = RANK_VARS + THREAD_VARS + (RUN_DIR_ENV, DATA_PARALLEL_ENV)


class RankEnvError(RuntimeError):
    """A rank's environment is missing a variable or holds a bad value."""


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    run_dir: Path | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def available_cpus() -> int:
    """CPUs this process may run on (respects cpusets / taskset), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_threads_per_rank(local_world_size: int) -> int:
    return max(1, available_cpus() // max(1, local_world_size))


def rank_env(
    rank: int,
    world_size: int,
    local_rank: int,
    local_world_size: int,
    master_addr: str,
    master_port: int,
    threads_per_rank: int | None = None,
) -> dict[str, str]:
    """The variables one rank needs, as strings ready for ``subprocess.Popen(env=...)``."""
    _check_ranks(rank, world_size, local_rank, local_world_size)
    if not 0 < int(master_port) < 65536:
        raise ValueError(f"master_port must be in 1..65535, got {master_port}")
    threads = (
        threads_per_rank
        if threads_per_rank is not None
        else default_threads_per_rank(local_world_size)
    )
    if threads < 1:
        raise ValueError(f"threads_per_rank must be >= 1, got {threads}")
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(local_world_size),
        "MASTER_ADDR": str(master_addr),
        "MASTER_PORT": str(int(master_port)),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }


def _check_ranks(rank: int, world_size: int, local_rank: int, local_world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    if not 1 <= local_world_size <= world_size:
        raise ValueError(f"local_world_size must be in 1..{world_size}, got {local_world_size}")
    if not 0 <= local_rank < local_world_size:
        raise ValueError(f"local_rank must be in 0..{local_world_size - 1}, got {local_rank}")


# Where free_port looks: below the kernel's ephemeral range (net.ipv4.ip_local_port_range). A port
# of that range, which bind(0) returns, is also what the kernel hands every outgoing connection
# as its local port, so between the probe and the ranks' listen another process's connection can
# take it (seen: EADDRINUSE with two runs starting at once on one machine). Below the range only
# another listener can.
_PORT_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST_PORT = 20000


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now, outside the ephemeral range when there is
    room below it (else one the OS picks)."""
    port = _free_port_below_ephemeral_range(host)
    if port is not None:
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _free_port_below_ephemeral_range(host: str, tries: int = 50) -> int | None:
    """A random free port in [_LOWEST_PORT, the range's start); None when there is no such room
    (not Linux, no /proc, a range starting low) or no try found one."""
    import random

    try:
        ephemeral_low = int(_PORT_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if ephemeral_low <= _LOWEST_PORT:
        return None
    candidates = random.SystemRandom()
    for _ in range(tries):
        port = candidates.randrange(_LOWEST_PORT, ephemeral_low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    return None


def read_rank_env(environ: Mapping[str, str] | None = None) -> RankEnv:
    """Read this rank's variables; raises RankEnvError naming the missing or bad variable."""
    env = os.environ if environ is None else environ
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT")
    ints = {name: _int_var(env, name) for name in names}
    addr = env.get("MASTER_ADDR", "")
    if not addr:
        raise RankEnvError(_missing("MASTER_ADDR"))
    try:
        _check_ranks(ints["RANK"], ints["WORLD_SIZE"], ints["LOCAL_RANK"], ints["LOCAL_WORLD_SIZE"])
    except ValueError as e:
        raise RankEnvError(f"inconsistent rank environment: {e}") from None
    run_dir = env.get(RUN_DIR_ENV)
    return RankEnv(
        rank=ints["RANK"],
        world_size=ints["WORLD_SIZE"],
        local_rank=ints["LOCAL_RANK"],
        local_world_size=ints["LOCAL_WORLD_SIZE"],
        master_addr=addr,
        master_port=ints["MASTER_PORT"],
        run_dir=Path(run_dir) if run_dir else None,
    )


def rank_var(name: str, environ: Mapping[str, str] | None = None) -> int:
    """One integer variable of the rank environment (RANK, WORLD_SIZE, ...); raises RankEnvError
    naming it when it is missing or not an integer."""
    return _int_var(os.environ if environ is None else environ, name)


def _int_var(env: Mapping[str, str], name: str) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        raise RankEnvError(_missing(name))
    try:
        return int(raw)
    except ValueError:
        raise RankEnvError(f"environment variable {name}={raw!r} is not an integer") from None


def _missing(name: str) -> str:
    return (
        f"environment variable {name} is not set: this program must be started as a rank "
        f"by a cluster backend (or torchrun), which sets {', '.join(RANK_VARS)}"
    )
