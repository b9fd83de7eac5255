"""What the training benchmarks share: launching a benchmark module on local ranks, and on each
rank the one set-up (the rank bootstrap, then a Trainer of the run's config) that the module's
measurement drives through the Trainer's public methods.

A benchmark module runs as ``python -m MODULE RUN_DIR REPEATS`` on every rank and calls
:func:`run_rank` with its measurement.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moe_parallel.train.trainer import Trainer

Measure = Callable[["Trainer", Path, int], None]  # (trainer, run directory, repeats)


def run_benchmark(
    config: str,
    overrides: list[str],
    repeats: int,
    module: str = "moe_parallel.bench.step_overhead",
) -> int:
    """Launcher side: validate, then run ``module`` on local ranks; returns their exit code."""
    from cluster import RunSpec, run_local
    from moe_parallel.launch_run import plan_train

    launch = plan_train(
        config,
        [*overrides, "checkpoint.save_at_end=false", "log.tensorboard=false"],
        None,
        None,
        nproc=None,
    )
    spec = RunSpec(
        run_dir=launch.run_dir,
        world_size=launch.cfg.world_size,
        entry=[sys.executable, "-m", module, str(launch.run_dir), str(repeats)],
    )
    return run_local(spec, stream=True)


def run_rank(measure: Measure, overrides: Sequence[str] = ()) -> None:
    """Rank side, from ``sys.argv`` (RUN_DIR REPEATS): set up, measure, leave the groups."""
    from moe_parallel.runtime.bootstrap import stop_rank

    run_dir, repeats = Path(sys.argv[1]), int(sys.argv[2])
    measure(start_trainer(run_dir, overrides), run_dir, repeats)
    stop_rank()


def start_trainer(run_dir: Path, overrides: Sequence[str] = ()) -> Trainer:
    """Bootstrap this rank on the CPU and build a Trainer of RUN_DIR/config.yaml (with
    ``overrides``) from fresh weights, silent, writing its metrics to a scratch directory: a
    benchmark repeats step numbers, which the run's own metrics.jsonl must not show."""
    from moe_parallel.runtime.bootstrap import prepare_process, start_rank

    prepare_process("cpu")  # the warning filters before anything imports Megatron
    from moe_parallel.config import load_config

    cfg = load_config(run_dir / "config.yaml", ["checkpoint.resume=none", *overrides])
    info = start_rank(cfg, "cpu")
    from moe_parallel.train.trainer import Trainer  # Megatron: after the bootstrap

    return Trainer(cfg, Path(tempfile.mkdtemp()), info, say=lambda message: None)


def step_at(trainer: Trainer, step: int) -> dict:
    """``trainer.train_step()`` on the batch after ``step`` (modulo ``train.steps``: the run's
    data covers that many steps, a benchmark may run more). Returns the step's record."""
    from moe_parallel.ckpt.checkpoint import Progress

    trainer.progress = Progress(step % trainer.cfg.train.steps, 0)
    return trainer.train_step()
