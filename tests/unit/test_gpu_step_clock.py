"""The GPU clock of the straggler report: on GPU ranks compute and communication times come from
CUDA timing events (the host does not wait inside NCCL collectives). No GPU here: a stand-in
event with the CUDA event's interface (record, synchronize, elapsed_time in ms) and a host
clock checks the wiring: events around every traced collective, compute = span - collectives.
On a GPU the same code runs with torch.cuda.Event."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from moe_parallel.monitor import collectives
from moe_parallel.monitor.stragglers import StragglerMonitor
from moe_parallel.runtime import faults

REAL_INSIDE_COLLECTIVE = faults.inside_collective  # restored after each test


class _HostEvent:
    def __init__(self):
        self.at = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: "_HostEvent") -> float:
        return (end.at - self.at) * 1000.0


@pytest.fixture
def one_rank(tmp_path, monkeypatch):
    dist.init_process_group(
        "gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1
    )
    monkeypatch.setattr(collectives, "timing_event", _HostEvent)
    yield
    collectives._gpu_pairs = None
    faults.inside_collective = REAL_INSIDE_COLLECTIVE
    collectives.uninstall()
    dist.destroy_process_group()


def test_gpu_clock_splits_a_step_into_compute_and_collectives(one_rank):
    monitor = StragglerMonitor(threshold=0.5, window=1, device=torch.device("cuda", 0))
    assert monitor.gpu_clock and collectives._gpu_pairs is not None
    faults.inside_collective = lambda name: time.sleep(0.2)  # "inside" the collective
    monitor.begin_step()
    time.sleep(0.1)  # compute
    dist.all_reduce(torch.ones(4))
    dist.barrier()
    compute, comm = monitor.own_times().tolist()
    assert 0.4 <= comm < 0.6, comm  # two collectives of 0.2 s
    assert 0.1 <= compute < 0.25, compute
    # The pairs were taken: the next step starts from nothing.
    faults.inside_collective = REAL_INSIDE_COLLECTIVE
    monitor.begin_step()
    assert collectives.take_gpu_comm_seconds() == 0.0


def test_host_clock_on_cpu_ranks_records_no_events(one_rank):
    monitor = StragglerMonitor(threshold=0.5, window=1, device=torch.device("cpu"))
    assert not monitor.gpu_clock and collectives._gpu_pairs is None
    faults.inside_collective = lambda name: time.sleep(0.1)
    monitor.begin_step()
    dist.all_reduce(torch.ones(4))
    compute, comm = monitor.own_times().tolist()
    assert 0.1 <= comm < 0.25 and compute < 0.1
