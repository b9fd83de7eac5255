"""The measured side of the planner's accuracy benchmark: the median training step of a run.

Launcher side, :func:`measure_step_times` validates the config, runs this module on local ranks
and returns the step times (s) the first rank recorded (one thread per rank); rank side, each rank builds the run's
Trainer and times ``repeats`` steps of ``Trainer.train_step`` (the step ``moectl train`` runs,
whose ``step_time_s`` the metrics log), after ``WARMUP_STEPS`` untimed ones, each between
barriers so that every rank's step is inside the figure.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moe_parallel.train.trainer import Trainer

WARMUP_STEPS = 2
RESULT_FILE = "step_times.json"


def measure_step_times(config: str, overrides: list[str], repeats: int) -> list[float]:
    """Run the config's layout on local ranks and return ``repeats`` step times in seconds."""
    import tempfile

    from cluster import RunSpec, run_local
    from moe_parallel.launch_run import plan_train
    from moe_parallel.runtime.bootstrap import local_rank_preload

    launch = plan_train(
        config,
        [*overrides, "checkpoint.save_at_end=false", "log.tensorboard=false"],
        tempfile.mkdtemp(prefix="moectl-step-time-"),  # scratch runs, not the user's runs/
        None,
        nproc=None,
    )
    spec = RunSpec(
        run_dir=launch.run_dir,
        world_size=launch.cfg.world_size,
        entry=[sys.executable, "-m", __name__, str(launch.run_dir), str(repeats)],
        threads_per_rank=1,  # one core per rank, as the calibration measures
        preload=local_rank_preload(launch.cfg.train.device),
    )
    code = run_local(spec, stream=False)
    if code != 0:
        raise RuntimeError(f"step-time run in {launch.run_dir} failed with exit code {code}")
    return json.loads((launch.run_dir / RESULT_FILE).read_text())


def measure(trainer: Trainer, run_dir: Path, args: list[str]) -> None:
    """``args``: [REPEATS] (bench.common.run_rank passes the arguments after RUN_DIR)."""
    import torch

    from moe_parallel.bench.common import step_at

    repeats = int(args[0])
    times = []
    for step in range(WARMUP_STEPS + repeats):
        torch.distributed.barrier()
        started = time.perf_counter()
        step_at(trainer, step)
        torch.distributed.barrier()
        times.append(time.perf_counter() - started)
    trainer.metrics.close()
    if trainer.info.is_logger:
        (run_dir / RESULT_FILE).write_text(json.dumps(times[WARMUP_STEPS:]))


if __name__ == "__main__":
    from moe_parallel.bench.common import run_rank

    run_rank(measure, overrides=["monitor.enabled=false"])
