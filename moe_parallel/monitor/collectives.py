"""Which collective each rank is in, and how long it spent in collectives.

A rank stuck in a hung collective never returns to Python, so its heartbeat thread must be able
to say where it is: ``install()`` wraps torch.distributed's collective functions (the module
attributes Megatron-core calls) with a thin recorder of the collective entered, when, and the
time spent inside. Costs two ``perf_counter`` calls and a few attribute writes per collective.

``snapshot()`` is read by the heartbeat thread; ``take_comm_seconds()`` by the training loop once
per step (communication time for the straggler report: time blocked in collectives, which on a
healthy rank is mostly waiting for the slowest one).

On GPU ranks the host does not wait in a collective (NCCL enqueues it and returns), so host
clocks see no communication time. ``time_on_gpu()`` makes the wrapper also record a CUDA timing
event on the current stream before and after each collective; ``take_gpu_comm_seconds()`` sums
the time between each pair as the GPU ran them (a collective called with ``async_op=True`` is
only enqueued between its events; the wait for it is not traced, as on the host).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import time

import torch
import torch.distributed as dist

from moe_parallel.runtime import faults

# Not isend/irecv: torch's P2POp accepts only those two functions themselves (an identity
# check), and Megatron's pipeline schedules build P2POps from torch.distributed.isend/irecv.
# Pipeline transfers are traced through batch_isend_irecv (their wait is not: a rank waiting
# for a pipeline peer shows its phase, not a collective).
TRACED = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "send",
    "recv",
    "batch_isend_irecv",
    "gather",
    "scatter",
    "reduce",
)

_lock = threading.Lock()
_state = {"current": None, "entered": None, "last": None, "left": None, "comm_s": 0.0, "calls": 0}
_originals: dict[str, object] = {}
# (before, after) CUDA events of each collective since the last take, while GPU timing is on.
_gpu_pairs: list | None = None


def _traced(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.time()
        t0 = time.perf_counter()
        pairs = _gpu_pairs
        before = timing_event() if pairs is not None else None
        with _lock:
            _state["current"], _state["entered"] = name, start
        try:
            faults.inside_collective(name)  # a no-op unless a test armed the hang fault
            return fn(*args, **kwargs)
        finally:
            spent = time.perf_counter() - t0
            after = timing_event() if before is not None else None
            with _lock:
                _state["current"], _state["last"], _state["left"] = None, name, time.time()
                _state["comm_s"] += spent
                _state["calls"] += 1
                if after is not None:
                    pairs.append((before, after))

    wrapper.__moe_parallel_traced__ = True
    return wrapper


def install() -> None:
    """Wrap the collectives once per process (idempotent)."""
    for name in TRACED:
        fn = getattr(dist, name, None)
        if fn is None or getattr(fn, "__moe_parallel_traced__", False):
            continue
        _originals[name] = fn
        setattr(dist, name, _traced(name, fn))
    _trace_megatron_aliases()


def uninstall() -> None:
    for name, fn in _originals.items():
        setattr(dist, name, fn)
    _originals.clear()
    for (module, attr), fn in _alias_originals.items():
        setattr(module, attr, fn)
    _alias_originals.clear()


# Megatron-core binds some collectives when its modules are imported (``dist_all_gather_func =
# torch.distributed.all_gather_into_tensor``, ``from torch.distributed import
# _coalescing_manager``): wrapping torch.distributed's attributes misses those, and a rank's wait
# inside them (the MoE dispatcher's token-count all-gather, the distributed optimizer's coalesced
# gradient reduce-scatter) would count as compute. Their references are wrapped too, in the
# modules already imported when ``install()`` runs (it is called again once the model is built).
_MEGATRON_ALIASES = {
    "megatron.core.tensor_parallel.mappings": ("dist_all_gather_func", "dist_reduce_scatter_func"),
    "megatron.core.tensor_parallel.layers": ("dist_all_gather_func", "dist_reduce_scatter_func"),
    "megatron.core.distributed.param_and_grad_buffer": (
        "dist_all_gather_func",
        "dist_reduce_scatter_func",
        "_coalescing_manager",
    ),
    "megatron.core.transformer.multi_token_prediction": ("dist_all_gather_func",),
}
_alias_originals: dict[tuple[object, str], object] = {}


def _trace_megatron_aliases() -> None:
    for module_name, attrs in _MEGATRON_ALIASES.items():
        module = sys.modules.get(module_name)
        if module is None:
            continue
        for attr in attrs:
            fn = getattr(module, attr, None)
            if fn is None or getattr(fn, "__moe_parallel_traced__", False):
                continue
            _alias_originals[(module, attr)] = fn
            wrapped = (
                _traced_coalescing(fn)
                if attr == "_coalescing_manager"
                else _traced(fn.__name__.lstrip("_"), fn)
            )
            setattr(module, attr, wrapped)


def _traced_coalescing(manager):
    """``_coalescing_manager``: the coalesced collectives run (and are waited for) on exit."""

    @contextlib.contextmanager
    def wrapper(*args, **kwargs):
        timer = _ExitTimer("coalesced")
        with timer, manager(*args, **kwargs) as cm:
            yield cm
            timer.start()

    wrapper.__moe_parallel_traced__ = True
    return wrapper


class _ExitTimer:
    def __init__(self, name: str):
        self.name, self.t0, self.pairs, self.before = name, None, None, None

    def __enter__(self):
        return self

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.pairs = _gpu_pairs
        self.before = timing_event() if self.pairs is not None else None
        with _lock:
            _state["current"], _state["entered"] = self.name, time.time()

    def __exit__(self, *exc) -> bool:
        if self.t0 is not None:
            spent = time.perf_counter() - self.t0
            after = timing_event() if self.before is not None else None
            with _lock:
                _state["current"], _state["last"], _state["left"] = None, self.name, time.time()
                _state["comm_s"] += spent
                _state["calls"] += 1
                if after is not None:
                    self.pairs.append((self.before, after))
        return False


def snapshot() -> dict:
    """``current``: the collective this rank is inside (None between collectives), ``entered``:
    since when (epoch seconds); ``last``/``left``: the previous one and when it returned."""
    with _lock:
        return {k: _state[k] for k in ("current", "entered", "last", "left", "calls")}


def time_on_gpu() -> None:
    """Also time every collective on the GPU from now on (GPU ranks; see the module's doc)."""
    global _gpu_pairs
    with _lock:
        if _gpu_pairs is None:
            _gpu_pairs = []


def drop_gpu_comm() -> None:
    """Forget the collectives timed so far, without waiting for them (between steps)."""
    with _lock:
        if _gpu_pairs is not None:
            _gpu_pairs.clear()


def take_gpu_comm_seconds() -> float:
    """GPU seconds inside collectives since the previous call; waits for the last one's end
    event (the step's own work before it is then done too)."""
    with _lock:
        pairs = list(_gpu_pairs or ())
        if _gpu_pairs is not None:
            _gpu_pairs.clear()
    if pairs:
        pairs[-1][1].synchronize()
    return sum(before.elapsed_time(after) for before, after in pairs) / 1000.0


def timing_event():
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def take_comm_seconds() -> float:
    """Seconds spent inside collectives since the previous call."""
    with _lock:
        spent, _state["comm_s"] = _state["comm_s"], 0.0
    return spent
