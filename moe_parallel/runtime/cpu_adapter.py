"""The CPU adapter: lets Megatron-core's CUDA-assuming code run on CPU ranks (gloo).

Megatron-core allocates with ``device=torch.cuda.current_device()``, moves tensors with
``.cuda()``, forks CUDA RNG states, creates streams and events, and checks
``param.type()`` against ``torch.cuda.*Tensor`` names.  On a machine without a GPU this
module is switched on once per process, *before* any model is built, and rewrites exactly
those places.  Every rewrite is listed below with the reason it is needed; the places were
measured on megatron-core 0.16.1 / torch 2.13 (see shared/notes/megatron-on-cpu.md).

On a GPU node nothing here runs: ``activate_if_needed()`` returns False and leaves torch and
Megatron untouched.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_ACTIVE = False


def cpu_mode_requested() -> bool:
    """True when ranks must run on CPU: no usable GPU, or MOE_PARALLEL_DEVICE=cpu."""
    forced = os.environ.get("MOE_PARALLEL_DEVICE", "").lower()
    if forced not in ("", "cpu", "cuda"):
        raise ValueError(f"MOE_PARALLEL_DEVICE={forced!r}: allowed values are 'cpu' or 'cuda'")
    if forced == "cpu":
        return True
    if forced == "cuda":
        return False
    return not torch.cuda.is_available()


def is_active() -> bool:
    return _ACTIVE


def activate_if_needed() -> bool:
    """Switch the adapter on when this process runs on CPU. Returns whether it is on."""
    if cpu_mode_requested():
        activate()
    return _ACTIVE


def activate() -> None:
    """Install every CPU rewrite (idempotent)."""
    global _ACTIVE
    if _ACTIVE:
        return
    _patch_torch_cuda_namespace()
    _patch_tensor_methods()
    _CudaToCpuMode().__enter__()  # stays on for the life of the process
    _patch_megatron()
    _ACTIVE = True


# ---------------------------------------------------------------------------------------------
# 1. Device arguments: every "cuda" device becomes "cpu".
# ---------------------------------------------------------------------------------------------
_CPU = torch.device("cpu")


def _to_cpu_device(device: Any) -> Any:
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU  # torch.cuda.current_device() style ordinals
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device=`` keyword arguments and ``Tensor.to(<cuda>)`` to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func in (torch.Tensor.to,) and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        return func(*args, **kwargs)


def _patch_tensor_methods() -> None:
    # .cuda() is a no-op: the tensor already lives where compute happens.
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    # Megatron's optimizer wrappers and DDP dispatch on "torch.cuda.FloatTensor" names.
    original_type = torch.Tensor.type

    def cuda_named_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is not None:
            if isinstance(dtype, str):
                dtype = dtype.replace("torch.cuda.", "torch.")
            return original_type(self, dtype, non_blocking, **kwargs)
        name = original_type(self)
        if self.device.type == "cpu" and not name.startswith("torch.cuda."):
            name = name.replace("torch.", "torch.cuda.", 1)  # idempotent: checked above
        return name

    torch.Tensor.type = cuda_named_type  # type: ignore[method-assign]
    # record_stream is a CUDA caching-allocator hint; meaningless on CPU.
    torch.Tensor.record_stream = lambda self, stream: None  # type: ignore[method-assign]


# ---------------------------------------------------------------------------------------------
# 2. torch.cuda: device queries, RNG (mapped to the CPU generator), streams and events.
# ---------------------------------------------------------------------------------------------
class _NullStream:
    """Streams serialise nothing on CPU: every op is already synchronous."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        raise RuntimeError("CUDA events carry no timing on CPU ranks; time with time.perf_counter")


def _patch_torch_cuda_namespace() -> None:
    cuda = torch.cuda
    # One device per rank, the CPU, as on a GPU node with one GPU per rank. A count of 0 next to
    # a working current_device() is inconsistent, and Megatron reads the count: its training
    # seeding (megatron/training/initialize.py, _set_random_seed) fills the model-parallel RNG
    # tracker only when device_count() > 0, and the persistent checkpoint worker
    # (dist_checkpointing/strategies/async_utils.py) sets device rank % device_count().
    # torch.cuda.is_available() stays False: it asks whether torch was built with CUDA first.
    cuda.device_count = lambda: 1
    cuda.current_device = lambda: _CPU
    cuda.set_device = lambda device: None
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.current_stream = lambda device=None: _NullStream()
    cuda.default_stream = lambda device=None: _NullStream()
    cuda.stream = lambda stream=None: contextlib.nullcontext(stream)
    # The CUDA RNG is the CPU default generator here: Megatron's RNG tracker forks "the CUDA
    # generator" around tensor-parallel regions; on CPU the generator that dropout uses is the
    # CPU one, so forking must swap its state.
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    # Not torch.manual_seed: it calls torch.cuda.manual_seed_all itself.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed)
    cuda.manual_seed_all = lambda seed: None  # torch.manual_seed has seeded the CPU already
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.memory_allocated = lambda device=None: 0


# ---------------------------------------------------------------------------------------------
# 3. Megatron-core places that the generic rewrites above do not reach.
# ---------------------------------------------------------------------------------------------
def _patch_megatron() -> None:
    _patch_rng_tracker()
    _patch_moe_utils()
    _patch_uneven_collectives()
    _patch_dist_checkpointing()


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device=-1, clone=False, graph_safe=False):
        state = torch.get_rng_state()
        return state.clone() if clone else state

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state


def _patch_moe_utils() -> None:
    from megatron.core.transformer.moe import moe_utils

    # Without Transformer Engine the router's fp32 gemm path names te_general_gemm unbound.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    # all_to_all_single needs python split sizes; the original only converts CUDA tensors.
    def move_to_host(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = move_to_host
    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.maybe_move_tensor_to_cpu = move_to_host


def _patch_uneven_collectives() -> None:
    """gloo refuses all_gather / reduce_scatter on lists of unequal tensors ("invalid tensor
    size"), which Megatron uses when sequence parallelism meets expert parallelism. Pad every
    piece to the largest, use the equal-size collective, and keep the real rows."""
    from megatron.core.tensor_parallel import mappings

    original_gather = mappings._gather_along_first_dim
    original_scatter = mappings._reduce_scatter_along_first_dim

    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original_gather(input_, group, output_split_sizes, use_global_buffer)
        biggest = max(output_split_sizes)
        padded = input_.new_zeros((biggest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        gathered = input_.new_empty((biggest * group.size(), *input_.shape[1:]))
        torch.distributed.all_gather_into_tensor(gathered, padded.contiguous(), group=group)
        pieces = [gathered[i * biggest : i * biggest + n] for i, n in enumerate(output_split_sizes)]
        return torch.cat(pieces, dim=0)

    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return original_scatter(input_, group, input_split_sizes, use_global_buffer)
        biggest = max(input_split_sizes)
        pieces = torch.split(input_, input_split_sizes, dim=0)
        padded = input_.new_zeros((biggest * group.size(), *input_.shape[1:]))
        for i, piece in enumerate(pieces):
            padded[i * biggest : i * biggest + piece.shape[0]] = piece
        out = input_.new_empty((biggest, *input_.shape[1:]))
        torch.distributed.reduce_scatter_tensor(out, padded, group=group)
        return out[: input_split_sizes[group.rank()]].contiguous()

    mappings._gather_along_first_dim = gather
    mappings._reduce_scatter_along_first_dim = reduce_scatter


def _patch_dist_checkpointing() -> None:
    """The torch_dist writer collects results through a *spawn* Manager, whose child re-imports
    the launching script (and hangs if the script is unguarded); a fork Manager has no such
    trap and starts ~15x faster."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    def results_queue():
        if fa._results_queue is None:
            from multiprocessing.managers import SyncManager

            from cluster.procs import die_with_parent

            # The manager's server process lives as long as the rank; started with
            # PR_SET_PDEATHSIG it also dies with a rank that is SIGKILLed (measured: without
            # it the server outlived a killed rank, re-parented to init, on a SLURM node).
            manager = SyncManager(ctx=mp.get_context("fork"))
            manager.start(initializer=die_with_parent)
            fa._results_queue = manager.Queue()
        return fa._results_queue

    fa._get_write_results_queue = results_queue
    _patch_persistent_checkpoint_worker()


_MEGATRON_ASYNC_LOOP: Any = None


def _patch_persistent_checkpoint_worker() -> None:
    """Megatron's persistent checkpoint worker (``AsyncCallsQueue(persistent=True)``) is a
    *spawned* process: it starts with a fresh torch, without this adapter, and its first act is
    ``torch.cuda.set_device(rank % torch.cuda.device_count())``, then ``torch.cuda.synchronize()``
    after staging. The worker's entry is replaced by one that switches the adapter on first; the
    spawn pickles the entry by name, so the child imports this module and runs it."""
    global _MEGATRON_ASYNC_LOOP
    from megatron.core.dist_checkpointing.strategies.async_utils import PersistentAsyncCaller

    _MEGATRON_ASYNC_LOOP = PersistentAsyncCaller.async_loop
    PersistentAsyncCaller.async_loop = staticmethod(_persistent_worker_loop)


def _persistent_worker_loop(*args, **kwargs) -> None:
    activate()  # in the spawned worker: sets _MEGATRON_ASYNC_LOOP to this process's original
    _MEGATRON_ASYNC_LOOP(*args, **kwargs)
