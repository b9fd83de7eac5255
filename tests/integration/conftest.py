"""Fixtures for the integration tests."""

from __future__ import annotations

import os
import shutil

import pytest


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real two-host SLURM cluster on this machine (cluster.testbed.slurm), started once per
    session.  It is stopped at the end only when this fixture started it, so a cluster a user or
    another session left running stays up."""
    from cluster.testbed import slurm as slurm_local

    if os.geteuid() != 0:
        pytest.skip("a local SLURM cluster needs root (daemons, /etc/slurm, network namespaces)")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and apt-get is not available to install it")
    before = slurm_local.running()
    info = slurm_local.start(hosts=2)
    started_here = before is None or before.hosts != 2
    yield info
    if started_here:
        slurm_local.stop()


@pytest.fixture(scope="session")
def ray_cluster():
    """A real two-node Ray cluster on this machine (cluster.testbed.ray: head in the root network
    namespace, worker node in namespace moe-ray1, token authentication on), started once per
    session.  It is stopped at the end only when this fixture started it, so a cluster a user or
    another session left running stays up."""
    from cluster.testbed import ray as ray_local

    if os.geteuid() != 0:
        pytest.skip("a local Ray cluster needs root (network namespaces, a bridge, /var/lib)")
    if not shutil.which("ip") or not shutil.which("nsenter"):
        pytest.skip("the local Ray cluster needs `ip` (iproute2) and `nsenter` (util-linux)")
    pytest.importorskip("aiohttp_cors", reason="the dashboard (Jobs API) needs ray[default]")
    before = ray_local.running()
    info = ray_local.start()
    yield info
    if before is None:
        ray_local.stop()
