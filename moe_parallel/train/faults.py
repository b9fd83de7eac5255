"""Test-only fault injection, switched on by an environment variable and never by a config.

``MOE_PARALLEL_FAULT="kill:rank=1:step=7"`` makes rank 1 kill itself with SIGKILL right after
finishing step 7 (as a crashed node would: no cleanup, no checkpoint).
``MOE_PARALLEL_FAULT="kill_in_save:rank=0:step=5"`` kills rank 0 in the middle of the step-5
save: after the shards are written, before the manifest and the rename. Tests use it to prove
that the backend notices, stops the other ranks and that a resumed run continues correctly.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "MOE_PARALLEL_FAULT"
KINDS = ("kill", "kill_in_save")


def parse_fault(text: str) -> tuple[str, dict[str, int]]:
    kind, *fields = text.split(":")
    if kind not in KINDS:
        raise ValueError(f"{FAULT_ENV}={text!r}: allowed kinds are {', '.join(KINDS)} "
                         "(KIND:rank=R:step=S)")
    args = {}
    for item in fields:
        key, _, value = item.partition("=")
        if key not in ("rank", "step") or not value.isdigit():
            raise ValueError(f"{FAULT_ENV}={text!r}: expected {kind}:rank=R:step=S")
        args[key] = int(value)
    if set(args) != {"rank", "step"}:
        raise ValueError(f"{FAULT_ENV}={text!r}: expected {kind}:rank=R:step=S")
    return kind, args


def after_step(step: int, rank: int) -> None:
    _maybe_kill("kill", step, rank)


def during_save(step: int, rank: int) -> None:
    _maybe_kill("kill_in_save", step, rank)


def _maybe_kill(where: str, step: int, rank: int) -> None:
    text = os.environ.get(FAULT_ENV)
    if not text:
        return
    kind, args = parse_fault(text)
    if kind == where and args["rank"] == rank and args["step"] == step:
        print(f"[fault injection] rank {rank} killing itself ({kind}) at step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
