"""Elastic recovery on the local backend: a rank's host is marked lost, the run goes on with one
data-parallel replica from its latest checkpoint, and grows back to two at the first checkpoint
after the host is back. Every step's loss equals the uninterrupted DP2 run's."""

from __future__ import annotations

import pytest

from cluster import read_record
from cluster.local import LocalBackend, mark_host_lost, mark_hosts_back
from launch.cli import main
from moe_parallel.launch_run import plan_train, rank_spec
from moe_parallel.views.summary import summarize
from tests.conftest import ELASTIC, TEST_DATA, TINY, rel_diff
from tests.integration.cluster_helpers import (
    events,
    events_of,
    heartbeat_step,
    state,
    step_losses,
    wait_for,
)

pytestmark = pytest.mark.integration


def test_lost_host_shrinks_the_run_and_it_grows_back(
    tmp_path, data_cache, reference_elastic, capsys
):
    overrides = [*TEST_DATA, f"data.cache_dir={data_cache}", "log.tensorboard=false", *ELASTIC]
    launch = plan_train(TINY, overrides, str(tmp_path / "runs"), None, None)
    backend = LocalBackend(stream=False)
    handle = backend.submit(rank_spec(launch))
    run_dir = launch.run_dir
    backend.supervise_in_background(handle)
    wait_for(lambda: heartbeat_step(run_dir) >= 6, 300, "step 6")
    mark_host_lost(run_dir, 1)
    wait_for(lambda: events_of(run_dir, "elastic_shrink"), 300, "the shrink")
    wait_for(lambda: state(run_dir)["pids"] and len(state(run_dir)["pids"]) == 1, 60, "1 rank")
    shrunk_view = summarize(run_dir, read_record(run_dir))
    mark_hosts_back(run_dir)
    assert backend.wait(handle, timeout=600) == 0
    assert shrunk_view.ranks_text == "1/2"  # moectl status / watch / dashboard while shrunk
    assert main(["status", str(run_dir)]) == 0
    shown = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resize:")]
    assert len(shown) == 2, shown
    assert "[elastic_shrink] at step" in shown[0] and "data-parallel 2 -> 1" in shown[0]
    assert "[elastic_grow] at step" in shown[1] and "(1 -> 2 ranks)" in shown[1]

    s = state(run_dir)
    assert s["status"] == "completed", s
    shrink, grow = s["resizes"]
    assert (shrink["kind"], shrink["from_data_parallel"], shrink["to_data_parallel"]) == (
        "elastic_shrink",
        2,
        1,
    )
    assert "rank 1's host was lost" in shrink["cause"]
    assert (grow["kind"], grow["from_world_size"], grow["to_world_size"]) == ("elastic_grow", 1, 2)
    [shrunk] = events(run_dir, "elastic_shrink")
    [grown] = events(run_dir, "elastic_grow")
    assert shrunk["step"] == 4 and shrunk["from"]["data"] == 2 and shrunk["to"]["data"] == 1
    # It grows back at the first checkpoint after the host is back: step 8, or 12 when the one
    # rank passed step 8 before the supervisor saw the host (a fast machine; seen once).
    assert grown["step"] in (8, 12) and grown["from"]["data"] == 1 and grown["to"]["data"] == 2
    [stop] = events(run_dir, "stopped")
    assert stop == {"event": "stopped", "step": grown["step"], "signal": "grow_back"}
    # Steps 5 and 6 ran twice (DP2, then DP1 after the loss): every record matches the
    # uninterrupted DP2 run, and every step 1..16 was trained.
    seen = step_losses(run_dir)
    assert sorted({step for step, _ in seen}) == list(range(1, 17))
    for step, loss in seen:
        assert rel_diff(loss, reference_elastic[step]) < 1e-4, (step, loss, reference_elastic[step])
    assert [r["kind"] for r in s["restarts"]] == ["failed", "resized"]
