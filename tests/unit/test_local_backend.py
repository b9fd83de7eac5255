"""The local backend with real rank subprocesses: gloo collectives, failures, signals, streaming,
and the run directory / state.json it leaves behind.  No mocks."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from cluster import (
    LaunchError,
    LocalBackend,
    RankEnvError,
    RankFailure,
    Restart,
    RunLayout,
    RunRecord,
    RunSpec,
    RunState,
    list_runs,
    new_run_dir,
    rank_env,
    read_rank_env,
    read_record,
    registry,
    run_local,
    write_record,
)
from cluster.env import free_port

REPO = Path(__file__).resolve().parents[2]
RANK_ENV = {"PYTHONPATH": str(REPO)}

# ---------------------------------------------------------------------------------------------
# Rank programs
# ---------------------------------------------------------------------------------------------
ALLREDUCE = """
import json, sys
from pathlib import Path
import torch
import torch.distributed as dist
from cluster.env import read_rank_env

env = read_rank_env()
dist.init_process_group("gloo", init_method="env://")
t = torch.tensor([float(env.rank)])
dist.all_reduce(t)
result = {
    "rank": env.rank, "world_size": env.world_size, "local_rank": env.local_rank,
    "local_world_size": env.local_world_size, "sum": t.item(),
    "dist_rank": dist.get_rank(), "dist_world": dist.get_world_size(),
    "omp": __import__("os").environ["OMP_NUM_THREADS"], "run_dir": str(env.run_dir),
}
Path(sys.argv[1], f"rank{env.rank}.json").write_text(json.dumps(result))
dist.destroy_process_group()
"""

# Rank 1 dies with exit code 3 once both ranks are in the process group; rank 0 ignores SIGTERM,
# starts two children that ignore it too (one in its group, one in a new session), then hangs
# in a barrier rank 1 never joins (and keeps hanging if the barrier errors out).
RANK_DIES = """
import os, signal, subprocess, sys, time
from pathlib import Path

out = Path(sys.argv[1])
rank = int(os.environ["RANK"])
if rank == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"
    a = subprocess.Popen([sys.executable, "-c", stubborn])
    b = subprocess.Popen([sys.executable, "-c", stubborn], start_new_session=True)
    (out / "children.txt").write_text(f"{a.pid} {b.pid}")
import torch.distributed as dist
dist.init_process_group("gloo", init_method="env://")
if rank == 1:
    time.sleep(0.5)
    print("rank 1 about to die", flush=True)
    os._exit(3)
try:
    dist.barrier()
except Exception as e:
    print("barrier failed:", e, flush=True)
time.sleep(300)
"""

SIGKILLED = """
import os, signal, time
if os.environ["RANK"] == "1":
    time.sleep(0.3)
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(300)
"""

CHATTY = """
import os, sys
rank = os.environ["RANK"]
for i in range(3):
    print(f"hello from rank {rank} line {i}")
print(f"rank {rank} stderr line", file=sys.stderr)
"""

SLEEPER = """
import os, sys, time
from pathlib import Path
Path(sys.argv[1], "ready" + os.environ["RANK"]).write_text(str(os.getpid()))
time.sleep(300)
"""

LAUNCHER = """
import sys
from cluster import RunSpec, run_local
preload = tuple(sys.argv[3].split(",")) if sys.argv[3] else ()
spec = RunSpec(run_dir=sys.argv[1], world_size=int(sys.argv[2]), entry=sys.argv[4:], preload=preload)
sys.exit(run_local(spec, grace_s=1.0))
"""


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def _spec(tmp_path: Path, body: str, world_size: int, forked: bool = False) -> RunSpec:
    """The rank program as a script of its own, or (``forked``) as a module the local backend's
    fork server runs in ranks forked after importing torch."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    run_dir = new_run_dir(tmp_path / "runs", "test")
    if not forked:
        script = _script(tmp_path, "rank_prog.py", body)
        entry = [sys.executable, str(script), str(out)]
        return RunSpec(run_dir, world_size, entry, env=RANK_ENV, threads_per_rank=1)
    modules = tmp_path / "modules"
    modules.mkdir()
    _script(modules, "rank_prog.py", body)
    return RunSpec(
        run_dir,
        world_size,
        [sys.executable, "-m", "rank_prog", str(out)],
        env={"PYTHONPATH": f"{REPO}{os.pathsep}{modules}"},
        threads_per_rank=1,
        preload=("torch",),
    )


FORKED = pytest.mark.parametrize("forked", [False, True], ids=["fresh", "forked"])


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def _launcher(tmp_path: Path, spec: RunSpec) -> subprocess.Popen[str]:
    script = _script(tmp_path, "launcher.py", LAUNCHER)
    env = {**os.environ, "PYTHONPATH": spec.env.get("PYTHONPATH", str(REPO))}
    argv = [
        sys.executable,
        str(script),
        str(spec.run_dir),
        str(spec.world_size),
        ",".join(spec.preload),
        *spec.entry,
    ]
    # SIGINT at its default, as in a terminal: a test suite run as a background job inherits
    # SIGINT ignored, and the launcher rightly leaves an ignored signal ignored.
    return subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


# ---------------------------------------------------------------------------------------------
# Ranks that succeed
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "world_size,forked", [(2, False), (3, False), (2, True)], ids=["2", "3", "2-forked"]
)
def test_gloo_all_reduce_across_ranks(tmp_path: Path, world_size: int, forked: bool) -> None:
    spec = _spec(tmp_path, ALLREDUCE, world_size, forked)
    assert run_local(spec, stream=io.StringIO()) == 0

    for rank in range(world_size):
        got = json.loads((tmp_path / "out" / f"rank{rank}.json").read_text())
        assert got["sum"] == sum(range(world_size))
        assert (got["rank"], got["dist_rank"], got["local_rank"]) == (rank, rank, rank)
        assert (got["world_size"], got["dist_world"], got["local_world_size"]) == (world_size,) * 3
        assert got["omp"] == "1"
        assert got["run_dir"] == str(spec.run_dir.resolve())
    record = read_record(spec.run_dir)
    assert record.status is RunState.COMPLETED
    assert record.exit_code == 0 and record.failure is None
    assert len(record.pids) == world_size
    assert not any(_running(pid) for pid in record.pids)


def test_rank0_output_streamed_to_launcher_stdout(tmp_path: Path) -> None:
    spec = _spec(tmp_path, CHATTY, 2)
    launcher = _launcher(tmp_path, spec)
    stdout, stderr = launcher.communicate(timeout=30)
    assert launcher.returncode == 0, stderr

    for i in range(3):
        assert f"hello from rank 0 line {i}" in stdout
    assert "rank 0 stderr line" in stdout
    assert "rank 1" not in stdout
    logs = RunLayout(spec.run_dir).logs
    assert "hello from rank 1 line 2" in (logs / "rank1.log").read_text()
    assert "rank 1 stderr line" in (logs / "rank1.log").read_text()
    assert "hello from rank 0 line 2" in (logs / "rank0.log").read_text()
    assert read_record(spec.run_dir).status is RunState.COMPLETED


# ---------------------------------------------------------------------------------------------
# Failures
# ---------------------------------------------------------------------------------------------
@FORKED
def test_failed_rank_takes_the_run_down(tmp_path: Path, forked: bool) -> None:
    spec = _spec(tmp_path, RANK_DIES, 2, forked)
    start = time.monotonic()
    code = run_local(spec, stream=io.StringIO(), grace_s=1.0)
    assert time.monotonic() - start < 30
    assert code == 3

    record = read_record(spec.run_dir)
    assert record.status is RunState.FAILED
    assert record.exit_code == 3
    assert record.failure == RankFailure(
        rank=1, exit_code=3, signal=None, log_tail=record.failure.log_tail
    )
    assert "rank 1 about to die" in record.failure.log_tail
    assert "rank 1 exited with code 3" in record.failure_reason
    children = [int(p) for p in (tmp_path / "out" / "children.txt").read_text().split()]
    leftovers = [pid for pid in [*record.pids, *children] if _running(pid)]
    assert leftovers == [], f"processes of the run still running: {leftovers}"


@FORKED
def test_rank_killed_by_signal_is_reported_as_signal(tmp_path: Path, forked: bool) -> None:
    spec = _spec(tmp_path, SIGKILLED, 2, forked)
    code = run_local(spec, stream=io.StringIO(), grace_s=1.0)
    assert code == 128 + signal.SIGKILL

    record = read_record(spec.run_dir)
    assert record.status is RunState.FAILED
    assert record.failure is not None
    assert (record.failure.rank, record.failure.signal, record.failure.exit_code) == (
        1,
        "SIGKILL",
        None,
    )
    assert "rank 1 was killed by signal SIGKILL" in record.failure_reason
    assert not any(_running(pid) for pid in record.pids)


@pytest.mark.parametrize(
    "sig,forked",
    [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGTERM, True)],
    ids=["SIGTERM", "SIGINT", "SIGTERM-forked"],
)
def test_launcher_signal_cancels_every_rank(
    tmp_path: Path, sig: signal.Signals, forked: bool
) -> None:
    spec = _spec(tmp_path, SLEEPER, 2, forked)
    launcher = _launcher(tmp_path, spec)
    out = tmp_path / "out"
    _wait_for(lambda: (out / "ready0").exists() and (out / "ready1").exists())
    pids = [int((out / f"ready{r}").read_text()) for r in range(2)]
    # The ranks can be ready before the launcher has recorded them (it writes state.json once
    # every rank is started): wait for the record, not just the ranks.
    _wait_for(lambda: read_record(spec.run_dir).status is RunState.RUNNING)
    assert LocalBackend().status(_handle(spec)) is RunState.RUNNING  # read from state.json

    launcher.send_signal(sig)
    _, stderr = launcher.communicate(timeout=30)
    assert launcher.returncode == 128 + sig, stderr

    record = read_record(spec.run_dir)
    assert record.status is RunState.CANCELLED
    assert sig.name in record.failure_reason
    assert record.exit_code == 128 + sig
    assert record.pids == pids
    assert not any(_running(pid) for pid in pids)


def test_submit_wait_cancel_in_process(tmp_path: Path) -> None:
    spec = _spec(tmp_path, SLEEPER, 2)
    backend = LocalBackend(stream=False, grace_s=1.0)
    handle = backend.submit(spec)
    assert backend.status(handle) is RunState.RUNNING
    with pytest.raises(TimeoutError):
        backend.wait(handle, timeout=0.2)
    backend.cancel(handle)
    assert backend.status(handle) is RunState.CANCELLED
    assert backend.wait(handle) == 128 + signal.SIGTERM
    assert read_record(spec.run_dir).status is RunState.CANCELLED
    assert not any(_running(int(j)) for j in handle.job_ids)
    assert backend.logs(spec.run_dir, 1) == spec.run_dir / "logs" / "rank1.log"


def test_missing_executable_is_a_launch_error(tmp_path: Path) -> None:
    run_dir = new_run_dir(tmp_path, "bad")
    spec = RunSpec(run_dir, 2, [str(tmp_path / "no-such-program")])
    with pytest.raises(LaunchError, match="could not start rank 0"):
        LocalBackend(stream=False).submit(spec)
    record = read_record(run_dir)
    assert record.status is RunState.FAILED
    assert "no-such-program" in record.failure_reason


def test_spec_env_may_not_set_rank_variables(tmp_path: Path) -> None:
    spec = RunSpec(tmp_path, 1, ["true"], env={"RANK": "5"})
    with pytest.raises(ValueError, match="RANK"):
        LocalBackend(stream=False).submit(spec)
    with pytest.raises(ValueError, match="world_size"):
        RunSpec(tmp_path, 0, ["true"])


def _handle(spec: RunSpec):
    from cluster import RunHandle

    return RunHandle("local", spec.run_dir)


# ---------------------------------------------------------------------------------------------
# Rank environment
# ---------------------------------------------------------------------------------------------
def test_free_port_is_below_the_ephemeral_range_and_free() -> None:
    """Outgoing connections take their local ports from the ephemeral range; a master port
    there could be taken between the probe and the ranks' listen."""
    import socket

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_port() for _ in range(20)}
    assert all(20000 <= port < low for port in ports), (sorted(ports), low)
    assert len(ports) > 1  # drawn at random, not one fixed port
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.pop()))


def test_rank_env_round_trips_and_names_missing_variables() -> None:
    port = free_port()
    env = rank_env(2, 4, 0, 2, "127.0.0.1", port, threads_per_rank=3)
    assert env["RANK"] == "2" and env["WORLD_SIZE"] == "4" and env["LOCAL_WORLD_SIZE"] == "2"
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    got = read_rank_env(env)
    assert (got.rank, got.world_size, got.local_rank, got.local_world_size) == (2, 4, 0, 2)
    assert (got.master_addr, got.master_port) == ("127.0.0.1", port)
    assert int(rank_env(0, 1, 0, 1, "h", 1)["OMP_NUM_THREADS"]) >= 1

    del env["MASTER_PORT"]
    with pytest.raises(RankEnvError, match="MASTER_PORT"):
        read_rank_env(env)
    with pytest.raises(ValueError, match="rank must be in 0..1"):
        rank_env(2, 2, 0, 1, "h", 1)


# ---------------------------------------------------------------------------------------------
# Run directories and state.json
# ---------------------------------------------------------------------------------------------
def test_new_run_dir_never_reuses_a_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dirs = {new_run_dir(tmp_path, "my run/x") for _ in range(20)}
    assert len(dirs) == 20
    assert all(d.parent == tmp_path and d.name.startswith("my-run-x-") for d in dirs)
    assert all((d / "logs").is_dir() and (d / "checkpoints").is_dir() for d in dirs)

    suffixes = iter(["aaaaaa", "aaaaaa", "bbbbbb"])
    monkeypatch.setattr(registry, "_suffix", lambda: next(suffixes))
    monkeypatch.setattr(registry.time, "strftime", lambda fmt: "20250101-000000")
    first = new_run_dir(tmp_path, "same")
    (first / "marker").write_text("mine")
    second = new_run_dir(tmp_path, "same")
    assert first.name == "same-20250101-000000-aaaaaa"
    assert second.name == "same-20250101-000000-bbbbbb"
    assert (first / "marker").read_text() == "mine"

    monkeypatch.setenv("MOE_PARALLEL_RUNS", str(tmp_path / "from-env"))
    monkeypatch.setattr(registry, "_suffix", lambda: "cccccc")
    assert new_run_dir(name="env").parent == tmp_path / "from-env"


def test_state_json_round_trips_atomically(tmp_path: Path) -> None:
    run_dir = new_run_dir(tmp_path, "rt")
    record = RunRecord(
        backend="local",
        status=RunState.FAILED,
        world_size=2,
        entry=["python", "-m", "x"],
        job_ids=["11", "12"],
        pids=[11, 12],
        launcher_pid=10,
        started_at=registry.now_iso(),
        ended_at=registry.now_iso(),
        exit_code=137,
        failure=RankFailure(rank=1, signal="SIGKILL", log_tail=["a", "b"]),
        failure_reason="rank 1 was killed by signal SIGKILL",
        restarts=[Restart(at=registry.now_iso(), reason="node lost", attempt=1)],
    )
    write_record(run_dir, record)
    assert read_record(run_dir) == record
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "logs", "state.json"]
    assert json.loads((run_dir / "state.json").read_text())["status"] == "failed"

    record.status = RunState.COMPLETED
    write_record(run_dir, record)
    assert read_record(run_dir).status is RunState.COMPLETED

    entries = list_runs(tmp_path)
    assert [e.path for e in entries] == [run_dir] and entries[0].record == record

    (run_dir / "state.json").write_text(
        '{"backend": "local", "status": "exploded", "world_size": 1}'
    )
    with pytest.raises(ValueError, match="exploded"):
        read_record(run_dir)
    (run_dir / "state.json").write_text(
        '{"backend": "local", "status": "failed", "world_size": 1, "oops": 1}'
    )
    with pytest.raises(ValueError, match="oops"):
        read_record(run_dir)
    assert list_runs(tmp_path)[0].error is not None
    with pytest.raises(FileNotFoundError, match="state.json"):
        read_record(tmp_path / "nowhere")
