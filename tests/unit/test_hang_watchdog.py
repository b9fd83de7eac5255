"""Heartbeat files and the hang watchdog's decisions (one process, no training)."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch
import torch.distributed as dist

from cluster import watchdog
from cluster.registry import Hang, RunRecord, RunState, read_record, write_record
from cluster.watchdog import HangWatchdog, hang_signature, make_hang
from moe_parallel.monitor import collectives, heartbeat
from moe_parallel.runtime import faults

REAL_INSIDE_COLLECTIVE = faults.inside_collective  # restored after each test


# ---------------------------------------------------------------------------------------------
# Decision logic
# ---------------------------------------------------------------------------------------------
def beat(rank, step, phase="forward-backward", t=100.0, started=50.0, collective=None, since=None):
    return {
        "rank": rank,
        "host": "h",
        "pid": 1000 + rank,
        "started": started,
        "time": t,
        "step": step,
        "phase": phase,
        "collective": collective,
        "collective_since": since,
        "last_collective": "all_reduce",
        "stacks": f"/run/stacks/rank{rank}.{1000 + rank}.txt",
    }


def test_not_armed_while_a_rank_is_starting_up_or_missing():
    w = HangWatchdog(20, 2, since=40.0)
    assert w.observe({0: beat(0, None)}, now=100) is None  # rank 1 has no heartbeat yet
    assert w.observe({0: beat(0, 0), 1: beat(1, None, "startup")}, now=500) is None
    assert w.armed_at is None
    assert w.observe({0: beat(0, 0), 1: beat(1, 0)}, now=600) is None
    assert w.armed_at == 600
    assert w.observe({0: beat(0, 0), 1: beat(1, 0)}, now=619.9) is None
    assert w.observe({0: beat(0, 0), 1: beat(1, 0)}, now=620) is not None


def test_any_rank_stepping_is_progress():
    w = HangWatchdog(20, 2, since=40.0)
    assert w.observe({0: beat(0, 3), 1: beat(1, 3)}, now=0) is None
    assert w.observe({0: beat(0, 4), 1: beat(1, 3)}, now=15) is None  # rank 0 moved on
    assert w.observe({0: beat(0, 4), 1: beat(1, 3)}, now=34) is None  # 19 s since progress
    assert w.observe({0: beat(0, 4), 1: beat(1, 4)}, now=34.5) is None
    assert w.observe({0: beat(0, 4), 1: beat(1, 4)}, now=54.4) is None
    hang = w.observe(
        {
            0: beat(0, 4, t=54, collective="all_reduce", since=36.0),
            1: beat(1, 4, "optimizer", t=53),
        },
        now=54.5,
    )
    assert hang is not None
    assert hang["step"] == 4 and hang["idle_s"] == 20.0 and hang["hang_timeout_s"] == 20.0
    r0, r1 = hang["ranks"]
    assert (r0["collective"], r0["in_collective_s"], r0["heartbeat_age_s"]) == (
        "all_reduce",
        18.5,
        0.5,
    )
    assert (r1["phase"], r1["collective"], r1["in_collective_s"]) == ("optimizer", None, None)
    assert hang["stacks"] == ["/run/stacks/rank0.1000.txt", "/run/stacks/rank1.1001.txt"]


def test_heartbeats_of_an_earlier_attempt_are_ignored():
    w = HangWatchdog(5, 2, since=1000.0)
    old = {0: beat(0, 7, started=10.0), 1: beat(1, 7, started=10.0)}
    for now in (1000, 1010, 1100):
        assert w.observe(old, now=now) is None
    assert w.armed_at is None
    fresh = {0: beat(0, 4, started=1001.0), 1: beat(1, 4, started=1001.5)}
    assert w.observe(fresh, now=1200) is None
    assert w.observe(fresh, now=1205) is not None


def test_bad_timeout_refused():
    with pytest.raises(ValueError, match="hang_timeout must be > 0"):
        HangWatchdog(0, 2, since=0.0)


def test_hang_record_round_trips_through_state_json(tmp_path):
    w = HangWatchdog(1, 1, since=0.0)
    w.observe({0: beat(0, 2)}, now=10)
    found = w.observe({0: beat(0, 2)}, now=11)
    hang = make_hang(found, "local.0", {found["stacks"][0]: False})
    record = RunRecord(backend="local", status=RunState.RUNNING, world_size=1, hangs=[hang])
    write_record(tmp_path, record)
    back = read_record(tmp_path)
    assert back.hangs == [hang] and isinstance(back.hangs[0], Hang)
    assert back.hangs[0].stacks_missing == ["/run/stacks/rank0.1000.txt"]
    assert hang_signature(2, 20.0) == "hang: no rank finished a step for 20 s after step 2"
    assert "rank 0 on h pid 1000: step 2" in watchdog.describe(hang)


def test_state_json_without_hangs_still_reads(tmp_path):
    record = RunRecord(backend="local", status=RunState.COMPLETED, world_size=1)
    write_record(tmp_path, record)
    assert "hangs" not in json.loads((tmp_path / "state.json").read_text())
    assert read_record(tmp_path).hangs == []


# ---------------------------------------------------------------------------------------------
# Heartbeat files (a one-rank gloo group in this process)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()
    collectives.uninstall()
    faults.inside_collective = REAL_INSIDE_COLLECTIVE


def read_beat(path, newer_than):
    deadline = time.time() + 10
    while time.time() < deadline:
        if path.is_file():
            data = json.loads(path.read_text())
            if data["time"] > newer_than:
                return data
        time.sleep(0.05)
    raise AssertionError(f"no heartbeat newer than {newer_than} in {path}")


def test_heartbeat_reports_step_phase_memory_and_the_collective_it_is_stuck_in(
    tmp_path, one_rank_group
):
    monitor = heartbeat.RankMonitor(tmp_path, rank=3, interval_s=0.1).start()
    try:
        assert dist.all_reduce.__moe_parallel_traced__  # installed at rank start
        heartbeat.set_step(7)
        heartbeat.set_phase("optimizer")
        t0 = time.time()
        data = read_beat(tmp_path / "heartbeats" / "rank3.json", t0)
        assert (data["rank"], data["pid"], data["step"], data["phase"]) == (
            3,
            os.getpid(),
            7,
            "optimizer",
        )
        assert data["host"] and data["started"] <= t0 and data["phase_since"] >= t0 - 0.01
        assert 10e6 < data["rss_bytes"] < 100e9 and data["cuda_allocated_bytes"] is None
        assert data["collective"] is None
        assert data["stacks"] == str(tmp_path / "stacks" / f"rank3.{os.getpid()}.txt")

        inside, release = threading.Event(), threading.Event()

        def block(name):
            inside.set()
            release.wait(30)

        faults.inside_collective = block
        worker = threading.Thread(target=dist.all_reduce, args=(torch.ones(1),))
        worker.start()
        assert inside.wait(10)
        entered = time.time()
        stuck = read_beat(tmp_path / "heartbeats" / "rank3.json", entered + 0.2)
        assert stuck["collective"] == "all_reduce"
        assert entered - 1 < stuck["collective_since"] <= entered

        # The watchdog's signal: every thread's stack, the blocked one inside the wrapper.
        os.kill(os.getpid(), watchdog.STACK_SIGNAL)
        written = watchdog.wait_for_stacks([data["stacks"]], timeout_s=10)
        assert written == {data["stacks"]: True}
        stacks = open(data["stacks"]).read()
        assert "collectives.py" in stacks and "in wrapper" in stacks and "in block" in stacks
        release.set()
        worker.join(10)
        after = read_beat(tmp_path / "heartbeats" / "rank3.json", time.time())
        assert after["collective"] is None and after["last_collective"] == "all_reduce"
    finally:
        release_all = locals().get("release")
        if release_all is not None:
            release_all.set()
        monitor.stop()
        import faulthandler

        faulthandler.unregister(watchdog.STACK_SIGNAL)
    final = json.loads((tmp_path / "heartbeats" / "rank3.json").read_text())
    assert final["phase"] == "done"


def test_unknown_phase_refused():
    with pytest.raises(ValueError, match="unknown phase 'backward'"):
        heartbeat.set_phase("backward")


def test_status_lines_show_live_ranks_and_hang_records(tmp_path):
    folder = tmp_path / "heartbeats"
    folder.mkdir()
    for rank in range(2):
        b = {
            **beat(rank, 4, t=95.0, collective="all_reduce" if rank else None, since=70.0),
            "phase_since": 60.0,
            "rss_bytes": 300 * 2**20,
        }
        (folder / f"rank{rank}.json").write_text(json.dumps(b))
    w = HangWatchdog(1, 1, since=0.0)
    w.observe({0: beat(0, 2)}, now=10)
    hang = make_hang(w.observe({0: beat(0, 2)}, now=11), "local.0", {})
    lines = watchdog.status_lines(tmp_path, [hang], 2, running=True, now=100.0)
    assert lines[0] == (
        "rank 0:    step 4, forward-backward for 40 s, not in a collective, "
        "rss 300 MiB, heartbeat 5 s ago (h pid 1000)"
    )
    assert "in all_reduce for 30 s" in lines[1]
    assert lines[2].startswith("hang:      ") and "no step for 1 s after step 2" in lines[2]
    assert watchdog.status_lines(tmp_path, [], 2, running=False) == []


def test_tracing_keeps_pipeline_p2p_ops_valid():
    """Megatron's pipeline builds P2POp(torch.distributed.isend/irecv, ...); torch accepts only
    those two functions themselves, so tracing must leave them unwrapped (PP runs failed)."""
    import subprocess
    import sys

    program = (
        "import socket, torch, torch.distributed as dist\n"
        "from moe_parallel.monitor import collectives\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()\n"
        "dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=0, world_size=1)\n"
        "collectives.install()\n"
        "dist.P2POp(dist.isend, torch.zeros(1), 0); dist.P2POp(dist.irecv, torch.zeros(1), 0)\n"
        "dist.destroy_process_group(); print('p2p ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "p2p ok" in done.stdout, done.stderr[-2000:]
