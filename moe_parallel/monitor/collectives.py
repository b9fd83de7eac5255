"""Which collective each rank is in, and how long it spent in collectives.

A rank stuck in a hung collective never returns to Python, so its heartbeat thread must be able
to say where it is: ``install()`` wraps torch.distributed's collective functions (the module
attributes Megatron-core calls) with a thin recorder of the collective entered, when, and the
time spent inside. Costs two ``perf_counter`` calls and a few attribute writes per collective.

``snapshot()`` is read by the heartbeat thread; ``take_comm_seconds()`` by the training loop once
per step (communication time for the straggler report: time blocked in collectives, which on a
healthy rank is mostly waiting for the slowest one).
"""

from __future__ import annotations

import functools
import threading
import time

import torch.distributed as dist

TRACED = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object",
          "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
          "broadcast", "broadcast_object_list", "barrier", "send", "recv", "isend", "irecv",
          "batch_isend_irecv", "gather", "scatter", "reduce")

_lock = threading.Lock()
_state = {"current": None, "entered": None, "last": None, "left": None, "comm_s": 0.0,
          "calls": 0}
_originals: dict[str, object] = {}
# Test-only: called inside the wrapper after the entry is recorded, before the real collective
# (moe_parallel.train.faults uses it to hang a rank inside a collective). None in real runs.
_inside_hook = None


def _traced(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.time()
        t0 = time.perf_counter()
        with _lock:
            _state["current"], _state["entered"] = name, start
        try:
            if _inside_hook is not None:
                _inside_hook(name)
            return fn(*args, **kwargs)
        finally:
            spent = time.perf_counter() - t0
            with _lock:
                _state["current"], _state["last"], _state["left"] = None, name, time.time()
                _state["comm_s"] += spent
                _state["calls"] += 1

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


def uninstall() -> None:
    for name, fn in _originals.items():
        setattr(dist, name, fn)
    _originals.clear()


def snapshot() -> dict:
    """``current``: the collective this rank is inside (None between collectives), ``entered``:
    since when (epoch seconds); ``last``/``left``: the previous one and when it returned."""
    with _lock:
        return {k: _state[k] for k in ("current", "entered", "last", "left", "calls")}


def take_comm_seconds() -> float:
    """Seconds spent inside collectives since the previous call."""
    with _lock:
        spent, _state["comm_s"] = _state["comm_s"], 0.0
    return spent
