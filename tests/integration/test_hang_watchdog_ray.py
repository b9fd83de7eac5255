"""The hang watchdog in the Ray driver, on a real Ray cluster (head + worker node): a rank hung
inside a collective is detected, its stacks are dumped by its actor, the hang is recorded and the
attempt restarted from the checkpoint, ending with the uninterrupted run's losses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TEST_DATA, TINY, TWELVE
from tests.integration.cluster_helpers import injected_hang, losses, state

pytestmark = pytest.mark.integration

ADDRESS = "http://127.0.0.1:8265"


# The submission runs in its own process: Ray caches its authentication mode per process, and an
# earlier in-process Ray client of the test session may have read it before the cluster's token
# was in the environment.
SUBMIT = """
import sys
from moe_parallel.launch_run import submit_run
done = submit_run(sys.argv[1], sys.argv[3:], None, "ray", sys.argv[2], None,
                  env={"MOE_PARALLEL_FAULT": "hang:rank=1:step=5:times=1"})
print("run directory:", done.launch.run_dir, flush=True)
sys.exit(done.backend.wait(done.handle, timeout=900))
"""


def test_ray_driver_detects_a_hang_and_restarts(
    ray_cluster, tmp_path, data_cache, reference_twelve
):
    overrides = [
        *TEST_DATA,
        f"data.cache_dir={data_cache}",
        "log.tensorboard=false",
        *TWELVE,
        "monitor.hang_timeout=10",
        "monitor.heartbeat_interval=1",
        "ray.strategy=STRICT_SPREAD",
        f"ray.address={ADDRESS}",
    ]
    # The fault reaches the ranks through RunSpec.env (the job's environment).
    done = subprocess.run(
        [sys.executable, "-c", SUBMIT, str(TINY), str(tmp_path / "runs"), *overrides],
        cwd=REPO,
        env={**os.environ, **ray_cluster.env()},
        capture_output=True,
        text=True,
        timeout=1000,
    )
    found = [
        line.split(": ", 1)[1]
        for line in done.stdout.splitlines()
        if line.startswith("run directory: ")
    ]
    assert found, f"submission failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    run_dir = Path(found[0])
    assert done.returncode == 0, (
        done.stdout[-3000:] + done.stderr[-3000:] + (run_dir / "state.json").read_text()
    )
    s = state(run_dir)
    assert s["status"] == "completed"
    assert len(s["hangs"]) == 1
    hang = s["hangs"][0]
    assert hang["step"] == 4 and hang["stacks_missing"] == []
    assert all(r["collective"] is not None for r in hang["ranks"]), hang["ranks"]
    # The hung rank is recorded inside the collective the fault blocked it in.
    assert hang["ranks"][1]["collective"] == injected_hang(run_dir), hang["ranks"]
    for path in hang["stacks"]:
        text = Path(path).read_text()
        assert "moe_parallel/monitor/collectives.py" in text and "in wrapper" in text
    assert [(r["kind"], r["step"]) for r in s["restarts"]] == [("failed", 4)]
    assert s["restarts"][0]["reason"].startswith("hang: no rank finished a step for 10 s")
    got = losses(run_dir)
    for step, loss in reference_twelve.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step
