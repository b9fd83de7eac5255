"""Asynchronous checkpoint saves: training waits only for the snapshot, not for the writes.

Megatron's temporal async caller forks a writer process per save. The fork is the snapshot:
on GPUs Megatron first copies the shards to host memory, on CPU ranks the forked child keeps the
pages as they were at the fork (copy-on-write) while training goes on changing them. Each writer
hashes the chunks it wrote, as they are on disk (``_HashingResults``). The steps after a save
poll for completion (one small all-reduce); the poll that finds every rank's writer done gathers
the write results, and rank 0 then publishes in a thread: the .metadata file, meta.json, the
manifest from the writers' hashes, the rename and ``latest``. A later poll learns that the
publish ended (one small broadcast) and reports the checkpoint.

A failed write, or a failed publish, surfaces at a poll as ``SaveFailed`` on every rank. A save
still unfinished after ``timeout_s`` is reported once, naming the ranks whose writer is still
running; the next save waits for it (two saves never overlap).

What still blocks training is the fixed per-save work before the fork; it is cut to what must
happen there (see ``_CachedStrategy`` and ``_ForkCloneWriter``):
- the save plan and global metadata are computed by the first save and reused while the state's
  structure stays the same (Megatron's cached plans: ``use_cached_ckpt_structure``, which checks
  itself that the central plan did not change), so later saves skip the plan gather;
- the sharding-integrity check (an all-gather of every shard's metadata) runs on the first save
  only; a later save skips it when every rank's structure signature (keys, shapes, offsets,
  replica ids, dtypes) equals the one validated, agreed by one small all-reduce;
- Megatron clones every CPU tensor that is a view (model parameters in the DDP buffer, the
  distributed optimizer's slices) before the fork, a full copy of the state; the fork already is
  the snapshot, so here the clone happens in the writer, after the fork;
- the distributed optimizer's state is saved by each data-parallel rank as its own slice
  (``optimizer_state.saving_states``): no gather before the fork.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
)
from megatron.core.dist_checkpointing.strategies import torch as torch_strategy
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.utils import _get_failure_dict

from moe_parallel.runtime import faults

from . import checkpoint as ck
from .manifest import write_chunk_hashes


@dataclass
class _Pending:
    step: int
    path: Path
    started: float
    stall_reported: bool = False
    written: bool = False  # every rank's writer has finished; rank 0 is publishing
    publisher: threading.Thread | None = None  # rank 0's publish
    outcome: tuple[str, str] | None = None  # rank 0: ("failed" | "error", message)


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
        ck.on_rank0_then_agree(
            lambda: ck.prepare_partial(root, partial),
            ck.SaveFailed,
            "preparing the checkpoint failed on rank 0: ",
        )
        state = ck.sharded_state(objs, progress, with_rng=True, is_loading=False)
        signature = _structure_signature(state)
        validate = not _agree_all(signature == self.validated)
        request = dist_checkpointing.save(
            state,
            str(partial),
            sharded_strategy=self.strategy,
            validate_access_integrity=validate,
            async_sharded_save=True,
        )
        if validate:
            self.validated = signature
        pending = _Pending(progress.step, final, time.time())
        request.add_finalize_fn(
            lambda: self._begin_publish(
                pending,
                lambda: ck.publish(root, partial, final, progress, cfg, keep={final, protect}),
            )
        )
        self.queue.schedule_async_request(request)
        self.pending = pending
        faults.writer_started(progress.step, torch.distributed.get_rank(), self._writer_pid())
        return time.perf_counter() - began

    def poll(self) -> tuple[Path | None, str | None]:
        """(published checkpoint or None, stall report or None); raises SaveFailed."""
        if self.pending is None:
            return None, None
        if not self.pending.written and not self._finalize(blocking=False):
            return None, self._stall_report()
        return self._published(blocking=False), None

    def wait(self) -> Path | None:
        if self.pending is None:
            return None
        if not self.pending.written:
            self._finalize(blocking=True)
        return self._published(blocking=True)

    def _finalize(self, blocking: bool) -> bool:
        try:
            return bool(self.queue.maybe_finalize_async_calls(blocking=blocking))
        except (Exception, CheckpointException) as exc:  # DCP's is a BaseException
            pending, self.pending = self.pending, None
            if isinstance(exc, ck.SaveFailed):
                raise
            raise ck.SaveFailed(f"writing {pending.path.name} failed: {exc}") from exc

    def _begin_publish(self, pending: _Pending, publish) -> None:
        """Every writer has finished (Megatron's finalize, on every rank). Rank 0 publishes
        (meta.json, manifest from the writers' hashes, rename, ``latest``, retention) in a
        thread, so training does not wait for that file work; ``_published`` learns the end."""
        pending.written = True
        if torch.distributed.get_rank() != 0:
            return
        write_metadata, self.strategy.metadata_write = self.strategy.metadata_write, None

        def run() -> None:
            try:
                write_metadata()
                publish()
            except (OSError, ValueError, ck.CheckpointCorrupt) as exc:
                pending.outcome = ("failed", f"publishing the checkpoint failed on rank 0: {exc}")
            except Exception as exc:  # a bug: the run stops, on every rank, at the next poll
                pending.outcome = (
                    "error",
                    f"publishing {pending.path.name} raised {type(exc).__name__}: {exc}",
                )

        pending.publisher = threading.Thread(target=run, name="checkpoint-publish")
        pending.publisher.start()

    def _published(self, blocking: bool) -> Path | None:
        """Whether rank 0 has published, agreed by all ranks (a broadcast from rank 0)."""
        p = self.pending
        if torch.distributed.get_rank() == 0 and blocking:
            p.publisher.join()
        done = int(torch.distributed.get_rank() != 0 or not p.publisher.is_alive())
        flag = torch.tensor([done], dtype=torch.int, device=_device())
        torch.distributed.broadcast(flag, src=0)
        if not int(flag):
            return None
        outcome = [p.outcome]
        torch.distributed.broadcast_object_list(outcome, src=0)
        self.pending = None
        if outcome[0] is None:
            return p.path
        kind, message = outcome[0]
        raise (ck.SaveFailed if kind == "failed" else RuntimeError)(message)

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
        return (
            f"the step-{p.step} save ({p.path.name}) is not finished after {waited:.0f} s; "
            f"ranks still writing: {busy}"
        )

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
    flags = [
        torch.zeros(1, dtype=torch.int, device=_device())
        for _ in range(torch.distributed.get_world_size())
    ]
    torch.distributed.all_gather(flags, torch.tensor([alive], dtype=torch.int, device=_device()))
    return [rank for rank, flag in enumerate(flags) if int(flag)]


def _structure_signature(state: dict) -> str:
    """What fixes the checkpoint's layout on this rank (not the values)."""
    import hashlib

    parts = []
    for v in nested_values(state):
        if isinstance(v, ShardedTensor):
            parts.append(
                (
                    "T",
                    v.key,
                    tuple(v.global_shape),
                    tuple(v.global_offset),
                    tuple(v.local_shape),
                    str(v.dtype),
                    v.replica_id,
                    v.axis_fragmentations,
                    v.flattened_range is not None,
                )
            )
        elif isinstance(v, ShardedTensorFactory):
            parts.append(("F", v.key, tuple(v.data.shape), str(v.data.dtype), v.replica_id))
        elif isinstance(v, ShardedObject):
            parts.append(("O", v.key, tuple(v.global_shape), tuple(v.global_offset), v.replica_id))
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
            (
                path,
                key,
                (
                    bytes_data,
                    [
                        (item, t.tensor if isinstance(t, _Deferred) else t)
                        for item, t in tensor_data
                    ],
                ),
            )
            for path, key, (bytes_data, tensor_data) in self.write_buckets
        ]

    @staticmethod
    def write_preloaded_data_multiproc(
        transform_list, use_msc, rank, write_buckets, global_results_queue
    ) -> None:
        write_buckets = [
            (path, key, (bytes_data, [(item, _own_storage(t)) for item, t in tensor_data]))
            for path, key, (bytes_data, tensor_data) in write_buckets
        ]
        folder = Path(write_buckets[0][0]).parent if write_buckets else None
        FileSystemWriterAsync.write_preloaded_data_multiproc(
            transform_list,
            use_msc,
            rank,
            write_buckets,
            _HashingResults(global_results_queue, folder),
        )


class _HashingResults:
    """Stands for the writer's result queue: once every file of this rank is written, and
    before the training process learns it, hashes each written chunk as it is on disk
    (``manifest.write_chunk_hashes``). The publish step then only reads these small files, where
    it read the whole checkpoint before. A hashing error is passed on as the write's error."""

    def __init__(self, queue, folder: Path | None):
        self.queue, self.folder = queue, folder

    def put(self, results) -> None:
        if isinstance(results, dict):
            try:
                _hash_written_chunks(self.folder, results)
            except OSError as exc:
                results = exc
        self.queue.put(results)


def _hash_written_chunks(folder: Path, results: dict) -> None:
    ranges: dict[str, list[tuple[int, int]]] = {}
    for write_results in results.values():
        for result in write_results:
            info = result.storage_data
            ranges.setdefault(info.relative_path, []).append((info.offset, info.length))
    for name, chunks in ranges.items():
        write_chunk_hashes(folder / name, chunks)


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
    """torch_dist saving with cached plans, writing through ``_ForkCloneWriter``, and with the
    metadata file (written by rank 0 in Megatron's finalize) left to the publish thread."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.metadata_write = None  # rank 0, after a finalize: writes the .metadata file

    def async_save(self, sharded_state_dict, checkpoint_dir):
        original = torch_strategy.FileSystemWriterAsync
        torch_strategy.FileSystemWriterAsync = _ForkCloneWriter
        try:
            return super().async_save(sharded_state_dict, checkpoint_dir)
        finally:
            torch_strategy.FileSystemWriterAsync = original

    def _get_save_and_finalize_callbacks(self, writer, save_state_dict_ret):
        request = super()._get_save_and_finalize_callbacks(writer, save_state_dict_ret)
        _, global_metadata, dist_wrapper = save_state_dict_ret

        def finalize_fn():
            """Megatron's save_state_dict_async_finalize, except that rank 0 keeps the
            metadata write for later (it pickles and fsyncs the whole chunk index)."""
            all_results = dist_wrapper.gather_object(writer.retrieve_write_results())
            failures = _get_failure_dict(all_results) if dist_wrapper.is_coordinator else {}
            flag = torch.tensor([int(bool(failures))], dtype=torch.int, device=_device())
            torch.distributed.broadcast(
                flag, src=dist_wrapper.coordinator_rank, group=dist_wrapper.group
            )
            if int(flag):
                raise CheckpointException("write", failures)
            if dist_wrapper.is_coordinator:
                self.metadata_write = lambda: writer.finish(global_metadata, all_results)

        return request._replace(finalize_fns=[finalize_fn])


def _device():
    # The CPU adapter maps this to the CPU; on GPU ranks NCCL needs the rank's GPU.
    return torch.cuda.current_device()
