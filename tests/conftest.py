"""Shared helpers: real training runs through the same path as `moectl train`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny" / "moe_tiny.yaml"
# A small corpus and vocabulary keep data preparation to a few seconds.
TEST_DATA = ["data.max_bytes=400000", "data.tokenizer_vocab_size=512"]


@dataclass
class Run:
    code: int
    run_dir: Path

    @property
    def records(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    @property
    def steps(self) -> list[dict]:
        return [r for r in self.records if "event" not in r]

    @property
    def losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in self.steps}

    def event(self, name: str) -> dict:
        found = [r for r in self.records if r.get("event") == name]
        assert found, f"no {name!r} event in {self.run_dir}/metrics.jsonl"
        return found[-1]

    def log(self, rank: int = 0) -> str:
        return (self.run_dir / "logs" / f"rank{rank}.log").read_text()


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data-cache")
    return path


@pytest.fixture
def train_run(tmp_path, data_cache, monkeypatch):
    """train_run(overrides, env=None, resume=None, config=TINY) -> Run (in a fresh runs dir)."""
    from moe_parallel.launch_run import launch_local, plan_train

    def run(overrides=(), env=None, resume=None, config=TINY) -> Run:
        all_overrides = [
            *TEST_DATA,
            f"data.cache_dir={data_cache}",
            "log.tensorboard=false",
            *overrides,
        ]
        launch = plan_train(
            None if resume else config, all_overrides, str(tmp_path / "runs"), resume, nproc=None
        )
        code = launch_local(launch, stream=False, env=env)
        return Run(code, launch.run_dir)

    return run


def under_ci() -> bool:
    """CI sets CI=true (GitHub Actions, GitLab, Buildkite and most others do)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(present: bool, missing: str) -> None:
    """A prerequisite of a test (root, a system tool, a filesystem feature).  Under CI its absence
    fails the test, naming what is missing; elsewhere the test is skipped with that reason, which
    the summary line reports (``-rs`` in pyproject's addopts)."""
    if present:
        return
    if under_ci():
        pytest.fail(f"missing prerequisite (CI=true, so this fails instead of skipping): {missing}")
    pytest.skip(missing)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI no test may skip, whatever skipped it (a pytest.skip or importorskip somewhere in a
    fixture): the skip becomes a failure that carries the skip's reason."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and under_ci() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI (CI=true), where nothing may skip: {reason}"


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


TWELVE = ["train.steps=12", "train.warmup_steps=2", "checkpoint.interval=4"]


@pytest.fixture(scope="session")
def reference_twelve(tmp_path_factory, data_cache) -> dict[int, float]:
    """Losses of the uninterrupted 12-step local run the cluster backends are compared with."""
    from moe_parallel.launch_run import launch_local, plan_train

    overrides = [*TEST_DATA, f"data.cache_dir={data_cache}", "log.tensorboard=false", *TWELVE]
    launch = plan_train(TINY, overrides, str(tmp_path_factory.mktemp("ref") / "runs"), None, None)
    assert launch_local(launch, stream=False) == 0
    return Run(0, launch.run_dir).losses


# Elastic recovery's runs: data-parallel 2 with expert parallel 1, so that one replica is a valid
# layout (tests/integration/test_elastic_*.py).
ELASTIC = [
    "train.steps=16",
    "train.warmup_steps=2",
    "checkpoint.interval=4",
    "parallel.expert=1",
    "recovery.mode=elastic",
    "recovery.wait_for_capacity_s=0",
]


@pytest.fixture(scope="session")
def reference_elastic(tmp_path_factory, data_cache) -> dict[int, float]:
    """Losses of the uninterrupted 16-step DP2 (EP1) run an elastic run is compared with."""
    from moe_parallel.launch_run import launch_local, plan_train

    overrides = [*TEST_DATA, f"data.cache_dir={data_cache}", "log.tensorboard=false", *ELASTIC]
    launch = plan_train(TINY, overrides, str(tmp_path_factory.mktemp("ref") / "runs"), None, None)
    assert launch_local(launch, stream=False) == 0
    return Run(0, launch.run_dir).losses


# Fixtures that start the local SLURM or Ray cluster: a session-wide daemon set that edits
# /etc/hosts and network namespaces, so only one xdist worker may own it.
CLUSTER_FIXTURES = {"slurm_cluster", "ray_cluster"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups into the node ids
def pytest_collection_modifyitems(config, items):
    """Group tests for ``pytest -n N --dist loadgroup`` (what .ci/run uses): every test that
    reaches a local cluster runs on one worker (whole modules, so a module's shared set-up is
    built once), every other module on a worker of its own choosing."""
    cluster_modules = {
        item.nodeid.split("::")[0] for item in items if CLUSTER_FIXTURES & set(item.fixturenames)
    }
    for item in items:
        module = item.nodeid.split("::")[0]
        group = "clusters" if module in cluster_modules else module
        item.add_marker(pytest.mark.xdist_group(group))
