"""Fixtures for the integration tests."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from collections.abc import Callable

import pytest

from tests.conftest import require

# Clusters this session started, by xdist group: stopped once the group's last test is done (its
# daemons would otherwise poll for the rest of the run), or at the end of the session.
_TO_STOP: dict[str, Callable[[], object]] = {}


@contextlib.contextmanager
def stopped_after_its_group(group: str, stop: Callable[[], object] | None):
    if stop is not None:
        _TO_STOP[group] = stop
    try:
        yield
    finally:
        if group in _TO_STOP:
            _TO_STOP.pop(group)()


def _group(item) -> str | None:
    marker = item.get_closest_marker("xdist_group")
    return marker.args[0] if marker else None


def pytest_runtest_teardown(item, nextitem):
    group = _group(item)
    if group in _TO_STOP and (nextitem is None or _group(nextitem) != group):
        _TO_STOP.pop(group)()


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real two-host SLURM cluster on this machine (cluster.testbed.slurm), started once per
    session.  It is stopped at the end only when this fixture started it, so a cluster a user or
    another session left running stays up."""
    from cluster.testbed import slurm as slurm_local

    require(
        os.geteuid() == 0, "root: a local SLURM cluster needs it (daemons, /etc/slurm, namespaces)"
    )
    require(
        bool(shutil.which("slurmctld") or shutil.which("apt-get")),
        "slurmctld (or apt-get to install SLURM): the local SLURM cluster runs the real daemons",
    )
    before = slurm_local.running()
    info = slurm_local.start(hosts=2)
    started_here = before is None or before.hosts != 2
    with stopped_after_its_group("slurm", slurm_local.stop if started_here else None):
        yield info


@pytest.fixture(scope="session")
def ray_cluster():
    """A real two-node Ray cluster on this machine (cluster.testbed.ray: head in the root network
    namespace, worker node in namespace moe-ray1, token authentication on), started once per
    session.  It is stopped at the end only when this fixture started it, so a cluster a user or
    another session left running stays up."""
    from cluster.testbed import ray as ray_local

    require(os.geteuid() == 0, "root: a local Ray cluster needs it (network namespaces, a bridge)")
    for tool, package in (("ip", "iproute2"), ("nsenter", "util-linux")):
        require(bool(shutil.which(tool)), f"`{tool}` ({package}): the Ray worker node's namespace")
    require(
        importlib.util.find_spec("aiohttp_cors") is not None,
        "aiohttp_cors (ray[default]): the Ray dashboard's Jobs API needs it",
    )
    before = ray_local.running()
    info = ray_local.start()
    with stopped_after_its_group("ray", ray_local.stop if before is None else None):
        yield info


@pytest.fixture(scope="session")
def local_plan(tmp_path_factory, data_cache):
    """(moectl's CompletedProcess, plan run directory) of the whole tiny BTX plan on local ranks
    (tests/integration/btx_helpers.py), built once for every worker of the run."""
    from tests.integration.btx_helpers import whole_local_plan

    return whole_local_plan(tmp_path_factory, data_cache)
