"""Asynchronous checkpoint saves: training waits only for the snapshot, not for the writes.

Megatron's temporal async caller forks a writer process per save. The fork is the snapshot:
on GPUs Megatron first copies the shards to host memory, on CPU ranks the forked child keeps the
pages as they were at the fork (copy-on-write) while training goes on changing them. The steps
after a save poll for completion (one small all-reduce); once every rank's writer has finished,
the same publish step as a synchronous save runs (meta.json, manifest, rename, ``latest``).

A failed write surfaces at that poll as ``SaveFailed`` on every rank. A save still unfinished
after ``timeout_s`` is reported once, naming the ranks whose writer is still running; the next
save waits for it (two saves never overlap).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from torch.distributed.checkpoint.api import CheckpointException

from ..train import faults
from . import checkpoint as ck


@dataclass
class _Pending:
    step: int
    path: Path
    started: float
    stall_reported: bool = False


class AsyncSaver:
    def __init__(self, timeout_s: float):
        self.queue = AsyncCallsQueue(persistent=False)
        self.timeout_s = timeout_s
        self.pending: _Pending | None = None

    def start(self, root: Path, objs, progress: ck.Progress, cfg, protect: Path | None) -> float:
        """Begin a save; returns the seconds training was blocked."""
        self.wait()
        began = time.perf_counter()
        final = root / ck.step_name(progress.step)
        partial = final.with_name(final.name + ck.PARTIAL)
        ck._on_rank0_then_agree(lambda: ck._prepare_partial(root, partial), ck.SaveFailed,
                                "preparing the checkpoint failed on rank 0: ")
        state = ck._sharded_state(objs, progress, with_rng=True, is_loading=False)
        request = dist_checkpointing.save(state, str(partial), async_sharded_save=True)
        request.add_finalize_fn(lambda: ck._on_rank0_then_agree(
            lambda: ck._publish(root, partial, final, progress, cfg, keep={final, protect}),
            ck.SaveFailed, "publishing the checkpoint failed on rank 0: "))
        self.queue.schedule_async_request(request)
        self.pending = _Pending(progress.step, final, time.time())
        faults.writer_started(progress.step, torch.distributed.get_rank(), self._writer_pid())
        return time.perf_counter() - began

    def poll(self) -> tuple[Path | None, str | None]:
        """(published checkpoint or None, stall report or None); raises SaveFailed."""
        if self.pending is None:
            return None, None
        if self._finalize(blocking=False):
            return self._done(), None
        return None, self._stall_report()

    def wait(self) -> Path | None:
        if self.pending is None:
            return None
        self._finalize(blocking=True)
        return self._done()

    def _finalize(self, blocking: bool) -> bool:
        try:
            return bool(self.queue.maybe_finalize_async_calls(blocking=blocking))
        except (Exception, CheckpointException) as exc:  # DCP's is a BaseException
            pending, self.pending = self.pending, None
            if isinstance(exc, ck.SaveFailed):
                raise
            raise ck.SaveFailed(f"writing {pending.path.name} failed: {exc}") from exc

    def _done(self) -> Path:
        path, self.pending = self.pending.path, None
        return path

    def _stall_report(self) -> str | None:
        # Decided on rank 0's clock and broadcast: every rank must enter the gather together.
        p = self.pending
        waited = time.time() - p.started
        late = int(not p.stall_reported and waited >= self.timeout_s)
        flag = torch.tensor([late], dtype=torch.int, device=_device())
        torch.distributed.broadcast(flag, src=0)
        if not int(flag):
            return None
        p.stall_reported = True
        busy = _ranks_still_writing(self.queue)
        return (f"the step-{p.step} save ({p.path.name}) is not finished after {waited:.0f} s; "
                f"ranks still writing: {busy}")

    def _writer_pid(self) -> int | None:
        if not self.queue.async_calls:
            return None
        process = getattr(self.queue.async_calls[-1].async_caller, "process", None)
        return process.pid if process is not None else None

    def close(self) -> None:
        self.queue.close()


def _ranks_still_writing(queue: AsyncCallsQueue) -> list[int]:
    alive = 0
    if queue.async_calls:
        process = getattr(queue.async_calls[0].async_caller, "process", None)
        alive = int(process is not None and process.is_alive())
    flags = [torch.zeros(1, dtype=torch.int, device=_device())
             for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(flags, torch.tensor([alive], dtype=torch.int, device=_device()))
    return [rank for rank, flag in enumerate(flags) if int(flag)]


def _device():
    # The CPU adapter maps this to the CPU; on GPU ranks NCCL needs the rank's GPU.
    return torch.cuda.current_device()
