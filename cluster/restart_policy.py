"""When a failed run is restarted: shared by every fault-tolerant backend (SLURM, Ray).

A failure is restarted from the newest checkpoint while fewer than ``max_restarts`` failures
were restarted before (preemptions do not count). A failure identical to the one before the last
restart, at the same step, is not restarted: the run made no progress, the cause is
deterministic, and restarting would loop.
"""

from __future__ import annotations

from cluster.registry import Restart


def refuse_restart(
    signature: str, step: int | None, restarts: list[Restart], max_restarts: int
) -> str | None:
    """Why this failure must not be restarted, or None when it may be."""
    failed_before = [r for r in restarts if r.kind == "failed"]
    if len(failed_before) >= max_restarts:
        return (
            f"{signature}; not restarting: max_restarts={max_restarts} failures were already "
            "restarted"
        )
    last = failed_before[-1] if failed_before else None
    if last is not None and last.reason == signature and last.step == step:
        return (
            f"{signature}; the same failure happened at the same step ({step}) before the last "
            "restart, so restarting again would loop: fix the cause, then "
            "`moectl submit --resume RUN_DIR`"
        )
    return None
