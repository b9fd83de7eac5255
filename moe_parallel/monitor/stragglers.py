"""Stragglers: ranks whose compute time per step stays well above the other ranks'.

Per step every rank measures its *compute* time (the step's wall time minus the time it spent
inside collectives, monitor/collectives.py) and its *communication* time (time inside
collectives). With synchronous collectives a slow rank's compute time is high and the others
wait for it inside collectives (their communication time is high), so the decision uses compute
time. The pairs travel in the step's expert-load all_reduce (train/moe_stats.py: each rank fills
its own slot of a [R, 2] zero tensor, so the sum is a gather) when the model has MoE layers, and
in one ``all_gather`` of two float64 per rank otherwise; the logging rank decides and reports.
Riding along costs no extra rendezvous of the ranks (on a busy host each one waits for the other
ranks to be scheduled), and it excludes that all_reduce itself from the times: compute and
communication are then measured from the step's start to just before it.

The decision (``StragglerDetector``, no communication): each step, a rank's ratio is its compute
time over the *lower* median of all ranks' compute times of that step (the lower median, so that
with two ranks a slow one is compared with the other rank and not with the mean of the two). A
rank is a straggler while the median of its ratios over the last ``window`` steps is above
``1 + threshold`` (and only once ``window`` steps have been seen): one slow step is not a
straggler, and one fast step does not end a straggler.

On GPU ranks the times are the GPU's: the host returns from NCCL collectives at once and then
waits wherever the step next synchronizes, so host clocks would show every rank computing the
slowest rank's time. There a CUDA event on the current stream marks the step's start and another
the moment ``own_times`` is taken, and the collectives in between are timed by events too
(``collectives.time_on_gpu``): compute is the GPU time between the marks minus that
communication time.

Shapes: R ranks (world size).
"""

from __future__ import annotations

import socket
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist

from . import collectives

_FLOOR_S = 1e-6  # a step's median compute time below a microsecond counts as one microsecond


@dataclass
class StragglerUpdate:
    current: dict[int, float]  # rank -> median ratio over the window, for every straggler now
    started: list[int] = field(default_factory=list)  # ranks that became stragglers this step
    ended: list[int] = field(default_factory=list)  # ranks that stopped being stragglers


class StragglerDetector:
    def __init__(self, threshold: float, window: int):
        if threshold <= 0 or window < 1:
            raise ValueError(
                f"straggler threshold must be > 0 and window >= 1, got "
                f"threshold={threshold}, window={window}"
            )
        self.threshold = threshold
        self.window = window
        self.ratios_WR: deque[list[float]] = deque(maxlen=window)
        self.current: dict[int, float] = {}

    def update(self, compute_R: Sequence[float]) -> StragglerUpdate:
        """One step's compute seconds per rank -> the stragglers now and what changed."""
        base = max(statistics.median_low(compute_R), _FLOOR_S)
        self.ratios_WR.append([c / base for c in compute_R])
        now = {}
        if len(self.ratios_WR) == self.window:
            for rank in range(len(compute_R)):
                ratio = statistics.median(step[rank] for step in self.ratios_WR)
                if ratio > 1.0 + self.threshold:
                    now[rank] = ratio
        update = StragglerUpdate(
            now,
            started=sorted(set(now) - set(self.current)),
            ended=sorted(set(self.current) - set(now)),
        )
        self.current = now
        return update


class StragglerMonitor:
    """Per-step timing exchange and straggler reports; every rank calls ``begin_step`` and
    ``end_step`` (``end_step`` is a collective)."""

    def __init__(self, threshold: float, window: int, device: torch.device):
        collectives.install()
        self.device = device
        self.gpu_clock = device.type == "cuda"  # see the module's doc
        if self.gpu_clock:
            collectives.time_on_gpu()
        self.start_event = None
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()
        self.started = time.perf_counter()
        self.own_slot: torch.Tensor | None = None
        self.hosts: list[str] = [""] * self.world
        dist.all_gather_object(self.hosts, socket.gethostname())
        self.detector = StragglerDetector(threshold, window)

    def begin_step(self) -> None:
        collectives.take_comm_seconds()  # forget collectives between steps (eval, saves)
        if self.gpu_clock:
            collectives.drop_gpu_comm()  # no wait for the GPU here: it may still be busy
            self.start_event = collectives.timing_event()
        self.started = time.perf_counter()
        self.own_slot = None

    def own_times(self) -> torch.Tensor:
        """[R * 2]: zeros but this rank's (compute, comm) seconds since ``begin_step``; summed
        over the ranks it is every rank's pair (ExpertLoad.ride_along)."""
        comm = collectives.take_comm_seconds()
        wall = time.perf_counter() - self.started
        if self.gpu_clock:
            wall, comm = self._gpu_times()
        times_R2 = torch.zeros(self.world, 2, dtype=torch.float64)
        times_R2[self.rank] = torch.tensor([max(wall - comm, 0.0), comm], dtype=torch.float64)
        self.own_slot = times_R2
        return times_R2.reshape(-1)

    def end_step(self, summed_times: torch.Tensor | None = None) -> tuple[dict, StragglerUpdate]:
        """(the record's fields, the update), from ``own_times`` summed over the ranks when it
        rode along the step's reduction, else gathered here (a collective)."""
        if summed_times is not None:
            if self.own_slot is None:
                raise RuntimeError(
                    "per-rank times were reduced, but own_times() was not taken this step"
                )
            times_R2 = summed_times.reshape(self.world, 2).cpu()
        else:
            times_R2 = self._gather_times()
        compute_R = times_R2[:, 0].tolist()
        update = self.detector.update(compute_R)
        record = {
            "rank_compute_s": [round(x, 6) for x in compute_R],
            "rank_comm_s": [round(x, 6) for x in times_R2[:, 1].tolist()],
            "stragglers": self.describe(update.current),
            "straggler_count": len(update.current),
        }
        return record, update

    def _gpu_times(self) -> tuple[float, float]:
        """(GPU seconds since the step's start event, GPU seconds inside collectives)."""
        end = collectives.timing_event()
        end.synchronize()
        comm = collectives.take_gpu_comm_seconds()
        return self.start_event.elapsed_time(end) / 1000.0, comm

    def _gather_times(self) -> torch.Tensor:
        mine = self.own_times()[2 * self.rank : 2 * self.rank + 2].to(self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(gathered, mine)
        return torch.stack(gathered).cpu()

    def describe(self, ratios: dict[int, float]) -> list[dict]:
        return [
            {"rank": r, "host": self.hosts[r], "ratio": round(ratio, 3)}
            for r, ratio in sorted(ratios.items())
        ]
