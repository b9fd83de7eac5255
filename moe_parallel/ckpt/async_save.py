"""Asynchronous checkpoint saves: training waits only for the snapshot, not for the writes.

Megatron's temporal async caller forks a writer process per save. The fork is the snapshot:
on GPUs Megatron first copies the shards to host memory, on CPU ranks the forked child keeps the
pages as they were at the fork (copy-on-write) while training goes on changing them. The steps
after a save poll for completion (one small all-reduce); once every rank's writer has finished,
the same publish step as a synchronous save runs (meta.json, manifest, rename, ``latest``).

A failed write surfaces at that poll as ``SaveFailed`` on every rank. A save still unfinished
after ``timeout_s`` is reported once, naming the ranks whose writer is still running; the next
save waits for it (two saves never overlap).

What still blocks training is the fixed per-save work before the fork; it is cut to what must
happen there (see ``_CachedStrategy`` and ``_ForkCloneWriter``):
- the save plan and global metadata are computed by the first save and reused while the state's
  structure stays the same (Megatron's cached plans: ``use_cached_ckpt_structure``, which checks
  itself that the central plan did not change), so later saves skip the plan gather;
- the sharding-integrity check (an all-gather of every shard's metadata) runs on the first save
  only; a later save skips it when every rank's structure signature (keys, shapes, offsets,
  replica ids, dtypes) equals the one validated, agreed by one small all-reduce;
- Megatron clones every CPU tensor that is a view (model parameters in the DDP buffer, the
  gathered optimizer states) before the fork, a full copy of the state; the fork already is the
  snapshot, so here the clone happens in the writer, after the fork.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import (ShardedObject, ShardedTensor,
                                                      ShardedTensorFactory)
from megatron.core.dist_checkpointing.strategies import torch as torch_strategy
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
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
        self.strategy = _CachedStrategy("torch_dist", 1, cached_metadata=True)
        self.validated: str | None = None  # structure signature whose integrity was checked

    def start(self, root: Path, objs, progress: ck.Progress, cfg, protect: Path | None) -> float:
        """Begin a save; returns the seconds training was blocked."""
        self.wait()
        began = time.perf_counter()
        final = root / ck.step_name(progress.step)
        partial = final.with_name(final.name + ck.PARTIAL)
        ck._on_rank0_then_agree(lambda: ck._prepare_partial(root, partial), ck.SaveFailed,
                                "preparing the checkpoint failed on rank 0: ")
        state = ck._sharded_state(objs, progress, with_rng=True, is_loading=False)
        signature = _structure_signature(state)
        validate = not _agree_all(signature == self.validated)
        request = dist_checkpointing.save(state, str(partial), sharded_strategy=self.strategy,
                                          validate_access_integrity=validate,
                                          async_sharded_save=True)
        if validate:
            self.validated = signature
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


def _structure_signature(state: dict) -> str:
    """What fixes the checkpoint's layout on this rank (not the values)."""
    import hashlib

    parts = []
    for v in nested_values(state):
        if isinstance(v, ShardedTensor):
            parts.append(("T", v.key, tuple(v.global_shape), tuple(v.global_offset),
                          tuple(v.local_shape), str(v.dtype), v.replica_id, v.axis_fragmentations,
                          v.flattened_range is not None))
        elif isinstance(v, ShardedTensorFactory):
            parts.append(("F", v.key, tuple(v.data.shape), str(v.data.dtype), v.replica_id))
        elif isinstance(v, ShardedObject):
            parts.append(("O", v.key, tuple(v.global_shape), tuple(v.global_offset),
                          v.replica_id))
        else:  # common state: its keys and types (values such as the step may change)
            parts.append(("C", type(v).__name__))
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def _agree_all(flag: bool) -> bool:
    t = torch.tensor([int(flag)], dtype=torch.int, device=_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(int(t))


class _ForkCloneWriter(FileSystemWriterAsync):
    """Megatron's async writer, with the clone of view tensors moved after the fork.

    ``torch.save`` of a view writes its whole storage, so views must be cloned before writing;
    Megatron does it in ``prepare_write_data``, before the fork, on the training's time. The
    forked writer sees the tensors as they were at the fork (copy-on-write), so cloning there
    gives the same bytes."""

    def prepare_write_data(self, plan, planner) -> None:
        resolve = planner.resolve_data

        def no_view_check(item):
            data = resolve(item)
            # Megatron clones a CPU tensor when its storage is larger than itself; hand it a
            # placeholder that passes the check and swap the real tensor back in afterwards.
            return _Deferred(data) if isinstance(data, torch.Tensor) else data

        planner.resolve_data = no_view_check
        try:
            super().prepare_write_data(plan, planner)
        finally:
            del planner.resolve_data
        self.write_buckets = [
            (path, key, (bytes_data, [(item, t.tensor if isinstance(t, _Deferred) else t)
                                      for item, t in tensor_data]))
            for path, key, (bytes_data, tensor_data) in self.write_buckets]

    @staticmethod
    def write_preloaded_data_multiproc(transform_list, use_msc, rank, write_buckets,
                                       global_results_queue) -> None:
        write_buckets = [
            (path, key, (bytes_data, [(item, _own_storage(t)) for item, t in tensor_data]))
            for path, key, (bytes_data, tensor_data) in write_buckets]
        FileSystemWriterAsync.write_preloaded_data_multiproc(
            transform_list, use_msc, rank, write_buckets, global_results_queue)


class _Deferred:
    """Stands for a tensor during ``prepare_write_data``: answers its view check (detach,
    device, storage size) as a tensor with storage of its own would."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor.detach()
        self.device = self.tensor.device
        self.numel = self.tensor.numel
        self.itemsize = self.tensor.itemsize
        self.nbytes = self.tensor.nbytes

    def detach(self):
        return self

    def untyped_storage(self):
        return _Size(self.tensor.numel() * self.tensor.itemsize)


class _Size:
    def __init__(self, n: int):
        self.n = n

    def size(self) -> int:
        return self.n


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cpu" and t.untyped_storage().size() != t.numel() * t.itemsize:
        return t.clone()
    return t


class _CachedStrategy(TorchDistSaveShardedStrategy):
    """torch_dist saving with cached plans, writing through ``_ForkCloneWriter``."""

    def async_save(self, sharded_state_dict, checkpoint_dir):
        original = torch_strategy.FileSystemWriterAsync
        torch_strategy.FileSystemWriterAsync = _ForkCloneWriter
        try:
            return super().async_save(sharded_state_dict, checkpoint_dir)
        finally:
            torch_strategy.FileSystemWriterAsync = original


def _device():
    # The CPU adapter maps this to the CPU; on GPU ranks NCCL needs the rank's GPU.
    return torch.cuda.current_device()
