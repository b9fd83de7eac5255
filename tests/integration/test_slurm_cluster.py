"""The local SLURM cluster (cluster.testbed.slurm) runs real multi-host jobs.

Two simulated hosts n1/n2 live in network namespaces on this machine; these tests check that
srun places one task on each, that each host resolves its name to its own address, and that
torch.distributed (gloo) works across them, as a multi-node training job needs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cluster.testbed import slurm as slurm_local

pytestmark = pytest.mark.integration

SRUN_TIMEOUT_S = 120
MASTER_PORT = 29611

GLOO_SCRIPT = textwrap.dedent(
    """
    import os, socket
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    rank = int(os.environ["SLURM_PROCID"])
    world = int(os.environ["SLURM_NTASKS"])
    os.environ["MASTER_ADDR"] = "n1"
    os.environ["MASTER_PORT"] = "{port}"
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method="env://",
                            timeout=timedelta(seconds=60))
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    print(f"rank={{rank}} host={{socket.gethostname()}} sum={{value.item():g}}", flush=True)
    dist.destroy_process_group()
    """
)


def _srun(args: list[str], cwd: Path | None = None) -> str:
    done = subprocess.run(
        ["srun", *args], capture_output=True, text=True, timeout=SRUN_TIMEOUT_S, cwd=cwd
    )
    assert done.returncode == 0, (
        f"srun {args} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout


def test_srun_places_one_task_on_each_simulated_host(slurm_cluster):
    out = _srun(
        [
            "-N2",
            "-n2",
            "--ntasks-per-node=1",
            "python3",
            "-c",
            "import socket; print(socket.gethostname(), socket.gethostbyname(socket.gethostname()))",
        ]
    )
    pairs = sorted(tuple(line.split()) for line in out.splitlines() if line.strip())
    assert pairs == [("n1", "10.77.0.11"), ("n2", "10.77.0.12")], out
    assert list(slurm_cluster.nodes) == ["n1", "n2"]
    assert list(slurm_cluster.node_addrs) == ["10.77.0.11", "10.77.0.12"]


def test_gloo_all_reduce_across_the_two_hosts(slurm_cluster, tmp_path):
    script = tmp_path / "allreduce.py"
    script.write_text(GLOO_SCRIPT.format(port=MASTER_PORT))
    # -w n1,n2 keeps rank 0 (the rendezvous host, MASTER_ADDR=n1) on n1.
    out = _srun(
        ["-N2", "-n2", "--ntasks-per-node=1", "-w", "n1,n2", sys.executable, str(script)],
        cwd=tmp_path,
    )
    found = sorted(re.findall(r"rank=(\d+) host=(\S+) sum=(\S+)", out))
    assert found == [("0", "n1", "3"), ("1", "n2", "3")], out


def test_start_is_idempotent_and_running_reports_it(slurm_cluster):
    t0 = time.monotonic()
    first = slurm_local.start(hosts=2)
    second = slurm_local.start(hosts=2)
    elapsed = time.monotonic() - t0
    assert first == second == slurm_cluster
    assert elapsed < 5, f"two start() calls on a running cluster took {elapsed:.1f} s"
    assert slurm_local.running() == slurm_cluster

    status = subprocess.run(
        [sys.executable, "-m", "cluster.testbed.slurm", "status"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    assert slurm_local.SlurmClusterInfo.from_json(json.loads(status.stdout)) == slurm_cluster

    states = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=30
    )
    nodes = dict(line.split() for line in states.stdout.splitlines())
    assert sorted(nodes) == ["n1", "n2"], states.stdout
    assert all(state in slurm_local.HEALTHY for state in nodes.values()), (
        states.stdout
    )  # not drained
    hosts = Path("/etc/hosts").read_text().splitlines()
    assert sorted(line for line in hosts if line.endswith(slurm_local.HOSTS_MARK)) == [
        f"10.77.0.11 n1 {slurm_local.HOSTS_MARK}",
        f"10.77.0.12 n2 {slurm_local.HOSTS_MARK}",
    ]
    assert Path(slurm_cluster.conf_path).read_text().splitlines()[0] == slurm_local.CONF_HEADER
