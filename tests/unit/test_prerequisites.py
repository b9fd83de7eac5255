"""A missing prerequisite (root, a system tool) fails the run under CI and is reported, with its
reason, everywhere else: the suite never passes by skipping what it could not run."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO

NEEDS = """
import pytest
from tests.conftest import require

def test_needs_a_tool():
    require(False, "frobnicator (apt-get install frob): the test drives it")

def test_skipped_by_a_fixture_library():
    pytest.importorskip("no_such_module_anywhere", reason="widgets need no_such_module_anywhere")

def test_present():
    require(True, "never shown")
"""


def run_pytest(tmp_path, ci: str | None) -> subprocess.CompletedProcess:
    test = tmp_path / "test_needs.py"
    test.write_text(NEEDS)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    command = [sys.executable, "-m", "pytest", "-c", str(REPO / "pyproject.toml"), "-q"]
    command += ["-p", "no:cacheprovider", "-p", "tests.conftest", str(test)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_under_ci_a_missing_prerequisite_fails_naming_it(tmp_path):
    done = run_pytest(tmp_path, ci="true")
    assert done.returncode == 1, done.stdout
    assert "2 failed, 1 passed" in done.stdout, done.stdout
    assert "frobnicator (apt-get install frob)" in done.stdout
    assert "widgets need no_such_module_anywhere" in done.stdout


def test_outside_ci_a_skip_is_reported_with_its_reason(tmp_path):
    done = run_pytest(tmp_path, ci=None)
    assert done.returncode == 0, done.stdout
    assert "1 passed, 2 skipped" in done.stdout, done.stdout
    summary = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(summary) == 2 and "frobnicator" in summary[0] + summary[1], done.stdout
