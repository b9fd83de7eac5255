"""Test-only fault injection, switched on by an environment variable and never by a config.

``MOE_PARALLEL_FAULT="kill:rank=1:step=7"`` makes rank 1 kill itself with SIGKILL right after
finishing step 7 (as a crashed node would: no cleanup, no checkpoint).
Kills of a synchronous save, one for each window (the three ``rank=0`` kinds fire in an async
save's publish too, a thread of rank 0, which the kill ends with its process):

- ``kill_before_writes:rank=R:step=S``: rank R, once ``step_S.partial/`` exists, before it
  writes any shard;
- ``kill_in_save:rank=R:step=S``: rank R, after its shards, before meta.json and the manifest;
- ``kill_before_manifest:rank=0:step=S``: rank 0's publish, after meta.json, before the manifest;
- ``kill_between_renames:rank=0:step=S``: a re-save of an existing step, after the old
  ``step_S`` was renamed to ``step_S.replaced`` and before the new one is renamed in;
- ``kill_before_latest:rank=0:step=S``: after the rename into place, before ``latest`` moves.

``MOE_PARALLEL_FAULT="kill_writer:rank=1:step=3"`` kills rank 1's background writer process of
the step-3 async save right after it starts.
``MOE_PARALLEL_FAULT="fail_save:rank=1:step=3"`` makes rank 1's writes of the step-3 save fail
as on a full quota (a 10 kB file size limit for the duration of that save).
``MOE_PARALLEL_FAULT="fail_publish:rank=0:step=3"`` makes rank 0's publish of the step-3 save
(meta.json, manifest, rename, ``latest``) fail with an OSError after every shard was written. Tests use it to prove
that the backend notices, stops the other ranks and that a resumed run continues correctly.
``MOE_PARALLEL_FAULT="hang:rank=1:step=5"`` makes rank 1 block forever inside the first
collective it enters during step 5: inside the traced wrapper of
:mod:`moe_parallel.monitor.collectives`, before the real collective, so its heartbeats and its
stack show the collective while the other ranks wait in the real one (the watchdog's test).
An optional ``:times=N`` makes a fault fire at most N times in the run directory (counted in
``RUN_DIR/.faults/``), so that a requeued run gets past it: ``kill:rank=1:step=7:times=1``.

Kinds with their own fields (no step, no times; moe_parallel/monitor tests):
``MOE_PARALLEL_FAULT="slow:rank=1:ms=300"`` makes rank 1 sleep 300 ms in every training step,
outside any collective (a straggler). ``MOE_PARALLEL_FAULT="route_one:expert=0"`` forces every
router to score expert 0 highest for every token (the logits' values become 10 for that expert
and 0 for the others; their gradients still reach the router weights), so that with ``top_k=1``
all tokens go to expert 0. ``MOE_PARALLEL_FAULT="route_uniform"`` makes every router's logits
(nearly) equal with a tie-break that rotates with the token's position, so that each expert gets
the same number of tokens when a micro-batch's tokens per rank are a multiple of the experts.
"""

from __future__ import annotations

import os
import resource
import signal
import time
from pathlib import Path

import torch

FAULT_ENV = "MOE_PARALLEL_FAULT"
# Points of rank 0's publish where a ``kill_<point>`` fault can fire (see publish_point).
PUBLISH_POINTS = ("before_manifest", "between_renames", "before_latest")
# Faults of the publish, which only rank 0 runs: their rank field must be 0.
RANK0_KINDS = ("fail_publish", *(f"kill_{point}" for point in PUBLISH_POINTS))
KINDS = (
    "kill",
    "kill_before_writes",
    "kill_in_save",
    "fail_save",
    "kill_writer",
    "hang",
    *RANK0_KINDS,
)
# Kinds whose fields are not rank/step: the fields each requires (all of them, nothing else).
OWN_FIELDS = {"slow": ("rank", "ms"), "route_one": ("expert",), "route_uniform": ()}
_SMALL_FILE_LIMIT = 10_000
_saved_limit: tuple[int, int] | None = None


def parse_fault(text: str) -> tuple[str, dict[str, int]]:
    kind, *fields = text.split(":")
    if kind in OWN_FIELDS:
        return kind, _own_fields(text, kind, fields)
    if kind not in KINDS:
        raise ValueError(
            f"{FAULT_ENV}={text!r}: allowed kinds are "
            f"{', '.join((*KINDS, *OWN_FIELDS))} (KIND:rank=R:step=S)"
        )
    args = {}
    for item in fields:
        key, _, value = item.partition("=")
        if key not in ("rank", "step", "times") or not value.isdigit():
            raise ValueError(f"{FAULT_ENV}={text!r}: expected {kind}:rank=R:step=S[:times=N]")
        args[key] = int(value)
    if not {"rank", "step"} <= set(args):
        raise ValueError(f"{FAULT_ENV}={text!r}: expected {kind}:rank=R:step=S[:times=N]")
    if kind in RANK0_KINDS and args["rank"] != 0:
        raise ValueError(f"{FAULT_ENV}={text!r}: {kind} fires in rank 0's publish; use rank=0")
    return kind, args


def after_step(step: int, rank: int) -> None:
    _maybe_kill("kill", step, rank)


_hang_armed = False


def before_step(step: int, rank: int) -> bool:
    """Before step ``step`` (1-based) starts.  True when this rank is to hang inside its next
    collective: the caller then routes collectives through the monitor's traced wrappers
    (``monitor.collectives.install``), which call :func:`inside_collective` before the real one."""
    global _hang_armed
    if _matches("hang", step, rank):
        print(
            f"[fault injection] rank {rank} will hang inside its next collective (step {step})",
            flush=True,
        )
        _hang_armed = True
    return _hang_armed


def inside_collective(name: str) -> None:
    """Called by the traced collective wrappers after the entry is recorded: hangs when armed."""
    if not _hang_armed:
        return
    print(f"[fault injection] hanging inside {name} since {time.time():.3f}", flush=True)
    while True:
        time.sleep(3600)


def during_save(step: int, rank: int) -> None:
    """Before the shards are written (``step_S.partial/`` exists)."""
    _maybe_kill("kill_before_writes", step, rank)
    if _matches("fail_save", step, rank):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG as an error, not a signal
        global _saved_limit
        _saved_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (_SMALL_FILE_LIMIT, _saved_limit[1]))
        print(
            f"[fault injection] rank {rank}: file size limit {_SMALL_FILE_LIMIT} B for the "
            f"step-{step} save",
            flush=True,
        )


def after_save_writes(step: int, rank: int) -> None:
    """After the shards are written."""
    _maybe_kill("kill_in_save", step, rank)


def publishing(step: int) -> None:
    """On rank 0, as a finished save is published (in a thread for async saves)."""
    if _matches("fail_publish", step, 0):
        print(f"[fault injection] rank 0: failing the publish of the step-{step} save", flush=True)
        raise OSError(f"injected failure publishing the step-{step} checkpoint")


def publish_point(point: str, step: int) -> None:
    """On rank 0 at ``point`` (one of PUBLISH_POINTS) of the publish: ``kill_<point>``."""
    if point not in PUBLISH_POINTS:
        raise ValueError(f"unknown publish point {point!r}; known: {', '.join(PUBLISH_POINTS)}")
    _maybe_kill(f"kill_{point}", step, 0)


def writer_started(step: int, rank: int, pid: int | None) -> None:
    if pid is not None and _matches("kill_writer", step, rank):
        print(
            f"[fault injection] rank {rank}: killing writer process {pid} of the step-{step} save",
            flush=True,
        )
        os.kill(pid, signal.SIGKILL)


def end_of_save() -> None:
    """Whatever the outcome of a save: undo a fail_save limit."""
    global _saved_limit
    if _saved_limit is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, _saved_limit)
        _saved_limit = None


def _matches(kind: str, step: int, rank: int) -> bool:
    text = os.environ.get(FAULT_ENV)
    if not text:
        return False
    found, args = parse_fault(text)
    if not (found == kind and args["rank"] == rank and args["step"] == step):
        return False
    return "times" not in args or _count_firing(text, args["times"])


def _count_firing(text: str, times: int) -> bool:
    """True (and one more firing recorded) while this fault has fired fewer than ``times``."""
    run_dir = os.environ.get("MOE_PARALLEL_RUN_DIR")
    if not run_dir:
        raise RuntimeError(f"{FAULT_ENV}={text!r} uses times=N, which needs MOE_PARALLEL_RUN_DIR")
    folder = Path(run_dir) / ".faults"
    folder.mkdir(exist_ok=True)
    name = text.replace(":", "_").replace("=", "-")
    fired = len(list(folder.glob(f"{name}.*")))
    if fired >= times:
        return False
    (folder / f"{name}.{fired}").touch()
    return True


def _maybe_kill(kind: str, step: int, rank: int) -> None:
    if _matches(kind, step, rank):
        print(f"[fault injection] rank {rank} killing itself ({kind}) at step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def _own_fields(text: str, kind: str, fields: list[str]) -> dict[str, int]:
    wanted = OWN_FIELDS[kind]
    usage = ":".join([kind, *(f"{name}=N" for name in wanted)])
    args = {}
    for item in fields:
        key, _, value = item.partition("=")
        if key not in wanted or not value.isdigit():
            raise ValueError(f"{FAULT_ENV}={text!r}: expected {usage}")
        args[key] = int(value)
    if set(args) != set(wanted):
        raise ValueError(f"{FAULT_ENV}={text!r}: expected {usage}")
    return args


def _own_fault(kind: str) -> dict[str, int] | None:
    """The fields of the configured fault when it is of this kind, else None."""
    text = os.environ.get(FAULT_ENV)
    if not text:
        return None
    found, args = parse_fault(text)
    return args if found == kind else None


def slow_step(rank: int) -> None:
    """Inside the step's compute (no collective open): ``slow`` sleeps on its rank."""
    args = _own_fault("slow")
    if args is not None and args["rank"] == rank:
        if not _slow_announced:
            print(f"[fault injection] rank {rank} sleeps {args['ms']} ms in every step", flush=True)
            _slow_announced.append(True)
        time.sleep(args["ms"] / 1000.0)


_slow_announced: list[bool] = []


_FORCED_LOGIT = 10.0
_TIE_BREAK = 1e-3


def install_routing(model_chunks) -> int:
    """``route_one``/``route_uniform``: replace every router's logits (their values; the
    gradient still flows to the router weights). Returns the number of routers changed."""
    args = _own_fault("route_one")
    uniform = _own_fault("route_uniform") is not None
    if args is None and not uniform:
        return 0
    from megatron.core.transformer.moe.router import TopKRouter

    routers = [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, TopKRouter)]
    for router in routers:
        router.gating = _forced_gating(router.gating, None if uniform else args["expert"])
    print(
        f"[fault injection] routing forced on {len(routers)} routers: "
        f"{'uniform' if uniform else 'all tokens to expert ' + str(args['expert'])}",
        flush=True,
    )
    return len(routers)


def _forced_gating(gating, expert: int | None):
    def forced(input):
        logits = gating(input)
        logits_TE = logits.reshape(-1, logits.shape[-1])
        num_tokens, num_experts = logits_TE.shape
        if expert is not None:
            if not 0 <= expert < num_experts:
                raise ValueError(
                    f"{FAULT_ENV}: route_one expert={expert}, but the routers have "
                    f"{num_experts} experts (0..{num_experts - 1})"
                )
            pattern_TE = torch.zeros_like(logits_TE)
            pattern_TE[:, expert] = _FORCED_LOGIT
        else:
            # Token t ranks expert (t - 1) mod E first, (t - 2) mod E next, ...
            t_T1 = torch.arange(num_tokens, device=logits.device).unsqueeze(1)
            e_1E = torch.arange(num_experts, device=logits.device).unsqueeze(0)
            pattern_TE = ((e_1E - t_T1) % num_experts).to(logits.dtype) * _TIE_BREAK
        return (logits_TE - logits_TE.detach() + pattern_TE).reshape(logits.shape)

    return forced
