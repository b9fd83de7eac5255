"""The lifecycle states of a run, as stored in ``state.json``."""

from __future__ import annotations

import enum


class RunState(str, enum.Enum):
    """Lifecycle of a run. The string values are what ``state.json`` stores."""

    PENDING = "pending"
    RUNNING = "running"
    REQUEUED = "requeued"  # back in the scheduler's queue after a preemption or a failure
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (RunState.COMPLETED, RunState.FAILED, RunState.CANCELLED)

    @classmethod
    def parse(cls, value: str) -> RunState:
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(s.value for s in cls)
            raise ValueError(
                f"unknown run status {value!r}: allowed values are {allowed}"
            ) from None
