"""Starting a BTX stage's training run on a backend, and reading where it stands.

Every stage goes through what `moectl submit` does (checks, run directory, the backend's
submit) on the backend the plan's cluster profile chooses. Local ranks are children of the
driver (each run supervised by a thread) and share this machine's cores; SLURM and Ray jobs keep
running without the driver, which re-attaches to them on `btx resume`.
"""

from __future__ import annotations

from pathlib import Path

from cluster import RunHandle, RunRecord, backend_for_profile, backend_for_run, read_record
from cluster.backend import BackendError
from cluster.profile import load_profile

from ..launch_run import Submission, load_run_config, start_run


class StageLauncher:
    def __init__(
        self,
        backend: str,
        cluster: str | None,
        profile_overrides: list[str],
        runs_root: Path,
        ranks_at_once: int,
    ):
        self.backend = backend_for_profile(
            load_profile(cluster, [*profile_overrides, f"backend={backend}"])
        )
        self.runs_root = runs_root
        self.threads = self.backend.shared_threads_per_rank(ranks_at_once)

    def start(
        self, config: str, overrides: list[str], resume_dir: str | None, env: dict[str, str]
    ) -> Path:
        """Submit (or resubmit, continuing ``resume_dir``) and return the run directory."""
        cfg, run_dir = load_run_config(config, overrides, resume_dir)
        done = start_run(
            Submission(cfg, run_dir, self.backend), str(self.runs_root), self.threads, env
        )
        self.backend.supervise_in_background(done.handle)
        return done.launch.run_dir


def current_record(run_dir: Path) -> RunRecord:
    """The run's record as its backend sees it now (a local run whose launcher is gone is
    recorded as failed; a queued run is corrected from the scheduler)."""
    record = read_record(run_dir)
    if record.status.terminal:
        return record
    try:
        backend_for_run(run_dir, record).status(RunHandle.of_run(run_dir, record))
    except (BackendError, FileNotFoundError, OSError):
        return record  # the scheduler did not answer: the record as it stands
    return read_record(run_dir)
