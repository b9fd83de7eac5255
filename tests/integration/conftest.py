"""Fixtures for the integration tests."""

from __future__ import annotations

import os
import shutil

import pytest


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real two-host SLURM cluster on this machine (cluster.slurm_local), started once per
    session.  It is stopped at the end only when this fixture started it, so a cluster a user or
    another session left running stays up."""
    from cluster import slurm_local

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
