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


def run_wide_dir(tmp_path_factory) -> Path:
    """A directory shared by every xdist worker of this pytest run (the parent of the workers'
    own base directories), or the session's base directory without xdist."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory, name: str, build):
    """``build()`` (JSON in, JSON out) run by the first worker that asks for ``name`` in this
    pytest run; the others wait for it and read its result, so set-up that every worker needs
    (a reference run, a whole BTX plan) is paid once."""
    from cluster.locks import exclusive_lock

    root = run_wide_dir(tmp_path_factory) / "built-once"
    root.mkdir(exist_ok=True)
    result = root / f"{name}.json"
    with exclusive_lock(root / f"{name}.lock"):
        if not result.is_file():
            tmp = root / f"{name}.json.tmp"
            tmp.write_text(json.dumps(build()))
            tmp.rename(result)
    return json.loads(result.read_text())


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One data cache for the whole run: preparation is locked per key and renamed into place
    (moe_parallel/data/prepare.py), so workers share it safely and prepare each corpus once."""
    path = run_wide_dir(tmp_path_factory) / "data-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture
def train_run(tmp_path, data_cache, monkeypatch):
    """train_run(overrides, env=None, resume=None, config=TINY, threads=None) -> Run (in a fresh
    runs dir); ``threads``: OMP threads per rank (None: the backend's share of the cores)."""
    from moe_parallel.launch_run import launch_local, plan_train

    def run(overrides=(), env=None, resume=None, config=TINY, threads=None) -> Run:
        all_overrides = [
            *TEST_DATA,
            f"data.cache_dir={data_cache}",
            "log.tensorboard=false",
            *overrides,
        ]
        launch = plan_train(
            None if resume else config, all_overrides, str(tmp_path / "runs"), resume, nproc=None
        )
        code = launch_local(launch, stream=False, threads_per_rank=threads, env=env)
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


def reference_losses(tmp_path_factory, data_cache, name: str, run_overrides) -> dict[int, float]:
    """Losses of an uninterrupted local run of the tiny config, run once for all workers."""

    def build() -> dict[str, float]:
        from moe_parallel.launch_run import launch_local, plan_train

        overrides = [*TEST_DATA, f"data.cache_dir={data_cache}", "log.tensorboard=false"]
        runs = run_wide_dir(tmp_path_factory) / name / "runs"
        launch = plan_train(TINY, [*overrides, *run_overrides], str(runs), None, None)
        assert launch_local(launch, stream=False) == 0
        return {str(step): loss for step, loss in Run(0, launch.run_dir).losses.items()}

    return {int(step): loss for step, loss in built_once(tmp_path_factory, name, build).items()}


@pytest.fixture(scope="session")
def reference_twelve(tmp_path_factory, data_cache) -> dict[int, float]:
    """Losses of the uninterrupted 12-step local run the cluster backends are compared with."""
    return reference_losses(tmp_path_factory, data_cache, "reference-twelve", TWELVE)


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
    return reference_losses(tmp_path_factory, data_cache, "reference-elastic", ELASTIC)


# Fixtures that start a local cluster, and the xdist group of the tests that use one: each
# cluster is a session-wide daemon set (network namespaces; SLURM's also /etc/hosts and
# /etc/slurm) whose tests assume the whole cluster is theirs, so one worker owns it. The two test
# beds share nothing (bridges on 10.77.0.0/24 and 10.78.0.0/24), so they run side by side.
CLUSTER_GROUPS = {"slurm_cluster": "slurm", "ray_cluster": "ray"}
# Groups that start first (.ci/run passes --no-loadscope-reorder, so xdist hands groups out in
# the order of their first test): the two clusters, then the local BTX plan, the longest ones.
FIRST_GROUPS = ("slurm", "ray", "tests/integration/test_btx_plan.py")
# Set-up that workers share through built_once (the local BTX plan): a cluster test that needs it
# goes last in its group, so that it finds the plan built instead of waiting for it.
SHARED_SETUP = {"local_plan"}


def xdist_group_of(module: str, clusters_used: set[str]) -> str:
    if len(clusters_used) > 1:
        raise pytest.UsageError(
            f"{module} uses the local clusters {sorted(clusters_used)}: a module may use one, so "
            "that each cluster's tests run on one xdist worker; split the module"
        )
    return next(iter(clusters_used), module)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups into the node ids
def pytest_collection_modifyitems(config, items):
    """Group tests for ``pytest -n N --dist loadgroup`` (what .ci/run uses): a module whose tests
    use a local cluster joins that cluster's group (whole modules, so a module's shared set-up is
    built once), every other module is a group of its own; the longest groups come first."""
    used: dict[str, set[str]] = {}
    for item in items:
        found = {group for name, group in CLUSTER_GROUPS.items() if name in item.fixturenames}
        used.setdefault(item.nodeid.split("::")[0], set()).update(found)
    group = {module: xdist_group_of(module, clusters) for module, clusters in used.items()}

    def order(item) -> tuple[int, bool]:
        g = group[item.nodeid.split("::")[0]]
        first = FIRST_GROUPS.index(g) if g in FIRST_GROUPS else len(FIRST_GROUPS)
        return first, g in CLUSTER_GROUPS.values() and bool(SHARED_SETUP & set(item.fixturenames))

    items.sort(key=order)  # stable: collection order otherwise, the same on every worker
    for item in items:
        item.add_marker(pytest.mark.xdist_group(group[item.nodeid.split("::")[0]]))
