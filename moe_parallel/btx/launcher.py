"""Starting a BTX stage's training run on a backend, and reading where it stands.

The local backend runs the ranks as children of the driver (each run supervised by a thread);
SLURM and Ray go through exactly what `moectl submit` does (checks, run directory, queued job)
and keep running without the driver, which re-attaches to them on `btx resume`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from cluster import RunHandle, RunRecord, read_record
from cluster.local import LocalBackend

from ..launch_run import plan_train, rank_spec, submit_run
from moe_parallel.views.status import refreshed


class StageLauncher:
    def __init__(self, backend: str, cluster: str | None, profile_overrides: list[str],
                 runs_root: Path, ranks_at_once: int):
        self.backend, self.cluster = backend, cluster
        self.profile_overrides, self.runs_root = list(profile_overrides), runs_root
        # Local branches share this machine's cores instead of each taking all of them.
        self.threads = max(1, (os.cpu_count() or 1) // max(ranks_at_once, 1))
        self.local = LocalBackend(stream=False) if backend == "local" else None

    def start(self, config: str, overrides: list[str], resume_dir: str | None,
              env: dict[str, str]) -> Path:
        """Submit (or resubmit, continuing ``resume_dir``) and return the run directory."""
        if self.local is None:
            done = submit_run(config, [*overrides, *self.profile_overrides], self.cluster,
                              self.backend, str(self.runs_root), resume_dir, env=env)
            return done.launch.run_dir
        launch = plan_train(config, overrides, str(self.runs_root), resume_dir, nproc=None)
        handle = self.local.submit(rank_spec(launch, self.threads, env))
        # The local backend records the outcome while a thread waits on the run.
        threading.Thread(target=self.local.wait, args=(handle,), daemon=True,
                         name=f"supervise:{launch.run_dir.name}").start()
        return launch.run_dir

    def cancel(self, run_dir: Path) -> None:
        if self.local is not None:
            self.local.cancel(RunHandle("local", run_dir))


def current_record(run_dir: Path) -> RunRecord:
    """The run's record as its backend sees it now (a local run whose launcher is gone is
    recorded as failed; a queued run is corrected from the scheduler)."""
    record = read_record(run_dir)
    if record.backend == "local":
        if not record.status.terminal:
            LocalBackend(stream=False).status(RunHandle("local", run_dir))
            record = read_record(run_dir)
        return record
    return refreshed(run_dir, record)[0]
