"""Stop requests: a signal asks the run to checkpoint and exit so that it can be requeued.

SLURM sends ``--signal`` (submitit's default: SIGUSR2) some time before the time limit or a
preemption, and SIGTERM on ``scancel`` / ``scontrol requeue`` / node shutdown; a local launcher
forwards SIGTERM on Ctrl-C.  A signal reaches the ranks at slightly different moments, so a rank
must not act on its own flag: after every step the ranks agree (one MAX all-reduce of a single
integer) and all of them stop after the same step, save the same checkpoint, and exit with
:data:`cluster.env.EXIT_REQUEUE`.  Megatron-LM's ``--exit-signal-handler`` does the same
agreement with an all-gather.
"""

from __future__ import annotations

import signal
from types import FrameType

import torch

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGUSR1, signal.SIGTERM)
# Not a signal: an elastic run's backend asked the ranks to stop at a checkpoint to restart them
# at a larger size (cluster/elastic.py). Above every signal number, so the MAX picks it.
GROW_BACK = "grow_back"
GROW_BACK_CODE = 1000


class StopRequest:
    """Installs handlers for the stop signals; :meth:`agreed` says whether any rank got one."""

    def __init__(self, device: torch.device, signals=STOP_SIGNALS) -> None:
        self.device = device
        self.received = 0
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only set a flag: a save cannot start inside a signal handler (it is a collective).
        self.received = self.received or int(signum)

    def agreed(self, resize: bool = False) -> str | None:
        """Collective: the name of the signal some rank received, :data:`GROW_BACK` when some
        rank was asked (``resize``) to stop for a grow-back, or None. Same on every rank."""
        mine = GROW_BACK_CODE if resize else self.received
        flag = torch.tensor([mine], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        code = int(flag.item())
        if code == GROW_BACK_CODE:
            return GROW_BACK
        return signal.Signals(code).name if code else None

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
