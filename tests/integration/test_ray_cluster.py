"""The local Ray cluster (cluster.testbed.ray) is a real two-node cluster.

The head runs in the root network namespace (10.78.0.1), the worker node in namespace moe-ray1
(10.78.0.11), token authentication on.  These tests check what the Ray backend relies on: both
nodes with their custom resources, a STRICT_SPREAD placement group with one actor per node whose
gloo all_reduce works across the nodes, the Jobs API with (and refused without) the token, and a
node lost as on a machine failure and brought back.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import ray
from ray.job_submission import JobStatus, JobSubmissionClient
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.testbed import ray as ray_local

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
HEAD_IP = "10.78.0.1"
WORKER_IP = "10.78.0.11"
NODE_LOSS_LIMIT_S = 60
JOB_TIMEOUT_S = 120

# Actors defined here go to the workers by value: the workers cannot import this test module
# (pytest put its directory on the driver's sys.path only).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def ray_env(ray_cluster):
    """This process's environment carries the cluster's token and addresses (RAY_AUTH_MODE,
    RAY_AUTH_TOKEN_PATH, RAY_ADDRESS, ...) for the tests of this module, then is restored."""
    saved = {name: os.environ.get(name) for name in ray_cluster.env()}
    os.environ.update(ray_cluster.env())
    _reread_ray_config()
    yield ray_cluster.env()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _reread_ray_config()


def _reread_ray_config() -> None:
    """Ray (2.60) reads RAY_AUTH_MODE into its config when it is imported, which happened at
    collection here; set later, the variable alone is ignored and ray.init fails with "Failed to
    connect to GCS ... InvalidAuthToken: Authentication token is missing or incorrect".  Re-read
    the config as Ray's own token setup does (authentication_token_setup._enable_token_auth)."""
    from ray._raylet import Config

    Config.initialize("")


@pytest.fixture(scope="module")
def driver(ray_cluster, ray_env):
    """A Ray driver connected to the local cluster with the token.  PYTHONPATH makes the
    workers import this checkout's `cluster` package (the editable install may point elsewhere)."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address=ray_cluster.gcs_address,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


def _alive_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n["Alive"]]


def _node_summary(nodes: list[dict]) -> list[tuple[str, float, list[str]]]:
    return sorted(
        (
            n["NodeManagerAddress"],
            n["Resources"].get("CPU"),
            sorted(k for k in n["Resources"] if k.startswith("moe_")),
        )
        for n in nodes
    )


def _wait_for(what: str, check, timeout_s: float, interval_s: float = 0.5):
    """Poll ``check()`` until it returns a truthy value; fail with ``what`` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached within {timeout_s:.0f} s")
        time.sleep(interval_s)


EXPECTED_NODES = [(HEAD_IP, 2.0, ["moe_head"]), (WORKER_IP, 2.0, ["moe_worker"])]


def test_two_alive_nodes_with_their_resources_and_addresses(driver, ray_cluster):
    # A worker node killed shortly before (an earlier session) counts as alive in the GCS until
    # its health checks fail, hence the wait.
    _wait_for(
        "exactly the head and the worker node alive",
        lambda: _node_summary(_alive_nodes()) == EXPECTED_NODES,
        timeout_s=30,
    )
    assert _node_summary(_alive_nodes()) == EXPECTED_NODES
    assert ray.cluster_resources()["CPU"] == 4.0
    assert (ray_cluster.head_ip, ray_cluster.worker_ip) == (HEAD_IP, WORKER_IP)
    assert ray_cluster.gcs_address == f"{HEAD_IP}:6390"
    env = ray_cluster.env()
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_ADDRESS"] == f"{HEAD_IP}:6390"
    token = Path(env["RAY_AUTH_TOKEN_PATH"])
    assert token == Path("/var/lib/moe-parallel/ray-local/auth_token")
    assert len(token.read_text().strip()) == 64 and token.stat().st_mode & 0o077 == 0
    assert ray_local.running() == ray_cluster


class GlooRank:
    """One rank of a two-process gloo group; one actor per node."""

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((ray.util.get_node_ip_address(), 0))
            return int(s.getsockname()[1])

    def all_reduce(self, rank: int, world: int, master_addr: str, master_port: int) -> dict:
        import psutil
        import torch
        import torch.distributed as dist

        from cluster.netif import interface_for_address

        ip = ray.util.get_node_ip_address()
        # The hostname resolves to 127.0.0.1 in both namespaces; without this gloo advertises
        # a loopback address and the peer on the other node gets "Connection refused".
        ifname = interface_for_address(ip)
        os.environ["GLOO_SOCKET_IFNAME"] = ifname
        os.environ["MASTER_ADDR"] = master_addr
        os.environ["MASTER_PORT"] = str(master_port)
        dist.init_process_group(
            "gloo", rank=rank, world_size=world, init_method="env://", timeout=timedelta(seconds=60)
        )
        try:
            value = torch.tensor([float(rank + 1), 10.0 * (rank + 1)])
            dist.all_reduce(value)
            return {
                "rank": rank,
                "ip": ip,
                "ifname": ifname,
                "sum": value.tolist(),
                "interfaces": sorted(psutil.net_if_addrs()),
            }
        finally:
            dist.destroy_process_group()


def test_strict_spread_actors_run_gloo_all_reduce_across_the_nodes(driver):
    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
    actors = []
    try:
        ray.get(pg.ready(), timeout=60)
        remote = ray.remote(GlooRank)
        actors = [
            remote.options(
                num_cpus=1,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=i
                ),
            ).remote()
            for i in range(2)
        ]
        ips = ray.get([a.node_ip.remote() for a in actors], timeout=60)
        assert sorted(ips) == [HEAD_IP, WORKER_IP]
        port = ray.get(actors[0].free_port.remote(), timeout=30)
        results = ray.get(
            [a.all_reduce.remote(rank, 2, ips[0], port) for rank, a in enumerate(actors)],
            timeout=120,
        )
    finally:
        for actor in actors:
            ray.kill(actor)
        remove_placement_group(pg)
    by_ip = {r["ip"]: r for r in results}
    assert sorted(by_ip) == [HEAD_IP, WORKER_IP]
    assert [r["sum"] for r in results] == [[3.0, 30.0], [3.0, 30.0]]
    assert by_ip[HEAD_IP]["ifname"] == "br-moeray"
    assert by_ip[WORKER_IP]["ifname"] == "ray0"
    assert by_ip[WORKER_IP]["interfaces"] == ["lo", "ray0"]  # really inside the namespace


def test_job_runs_through_the_jobs_api_with_the_token_and_is_refused_without(
    ray_cluster, ray_env, tmp_path
):
    client = JobSubmissionClient(ray_cluster.dashboard_url)
    marker = f"moe-ray-job-{uuid.uuid4().hex[:8]}"
    job_id = client.submit_job(entrypoint=f"python -c \"print('{marker}', 6 * 7)\"")
    final = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)
    status = _wait_for(
        "a final job status",
        lambda: (s := client.get_job_status(job_id)) in final and s,
        timeout_s=JOB_TIMEOUT_S,
    )
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs
    assert f"{marker} 42" in logs
    assert job_id in [j.submission_id for j in client.list_jobs()]

    # The same client without the token: no RAY_* variables, and a HOME without ~/.ray/auth_token.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)
    code = (
        "from ray.job_submission import JobSubmissionClient\n"
        f"JobSubmissionClient({ray_cluster.dashboard_url!r}).list_jobs()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0, done.stdout
    assert (
        "ray.exceptions.AuthenticationError: Authentication required: Unauthorized: Missing authentication token"
        in done.stderr
    ), done.stderr[-3000:]

    # And with a wrong token.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0, done.stdout
    assert (
        "ray.exceptions.AuthenticationError: Authentication failed: Forbidden: Invalid authentication token"
        in done.stderr
    ), done.stderr[-3000:]


def test_lost_worker_node_is_reported_dead_then_started_again(driver, ray_cluster):
    workers = [n for n in _alive_nodes() if n["NodeManagerAddress"] == WORKER_IP]
    assert len(workers) == 1, _node_summary(_alive_nodes())
    lost_id = workers[0]["NodeID"]
    try:
        t0 = time.monotonic()
        ray_local.stop_worker_node()
        pids = subprocess.run(
            ["ip", "netns", "pids", ray_cluster.worker_netns],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
        assert pids == []
        assert ray_local.running() is None
        _wait_for(
            "the lost worker node reported not alive",
            lambda: not any(n["Alive"] for n in ray.nodes() if n["NodeID"] == lost_id),
            timeout_s=NODE_LOSS_LIMIT_S,
        )
        print(
            f"worker node reported dead {time.monotonic() - t0:.1f} s after its processes were killed"
        )
        assert _node_summary(_alive_nodes()) == [(HEAD_IP, 2.0, ["moe_head"])]
    finally:
        t1 = time.monotonic()
        info = ray_local.start_worker_node()
        print(f"worker node alive again after {time.monotonic() - t1:.1f} s")
    assert info == ray_cluster
    assert _node_summary(_alive_nodes()) == EXPECTED_NODES
    new = [n for n in _alive_nodes() if n["NodeManagerAddress"] == WORKER_IP]
    assert new[0]["NodeID"] != lost_id

    @ray.remote(num_cpus=1, resources={"moe_worker": 1})
    def where() -> str:
        return ray.util.get_node_ip_address()

    assert ray.get(where.remote(), timeout=60) == WORKER_IP
    assert ray_local.running() == ray_cluster
