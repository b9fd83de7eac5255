"""Launcher side of ``moectl train``: config -> checks -> run directory -> local backend.

Everything a user can get wrong is checked here, before any rank starts: the config, the
device (FP8 without Transformer Engine, CUDA asked for on a CPU machine), the rank count, and
the data (prepared here, with progress, so ranks only read a finished cache).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from cluster import RunLayout, RunSpec, new_run_dir, run_local
from .config import RunConfig, check_world_size, dump_config, load_config, resolve_device
from .data import prepare


@dataclass
class TrainLaunch:
    cfg: RunConfig
    run_dir: Path


def plan_train(config_path: str | Path | None, overrides: Iterable[str], runs_root: str | None,
               resume_dir: str | None, nproc: int | None) -> TrainLaunch:
    """Validate everything and create (or reopen) the run directory; starts nothing."""
    if resume_dir is not None:
        run_dir = Path(resume_dir)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
        cfg = load_config(config_path or run_dir / "config.yaml", overrides)
    else:
        if config_path is None:
            raise ValueError("a config file is required (or --resume RUN_DIR)")
        cfg = load_config(config_path, overrides)
        run_dir = None
    check_world_size(cfg, nproc if nproc is not None else cfg.world_size)
    resolve_device(cfg, torch.cuda.is_available())
    prepare(cfg.data)  # fails here, with the path named, rather than on every rank
    if run_dir is None:
        run_dir = new_run_dir(Path(runs_root) if runs_root else None, cfg.name)
    RunLayout(run_dir).config.write_text(dump_config(cfg))
    return TrainLaunch(cfg, run_dir)


def launch_local(launch: TrainLaunch, stream: bool = True, threads_per_rank: int | None = None,
                 env: dict[str, str] | None = None) -> int:
    spec = RunSpec(
        run_dir=launch.run_dir,
        world_size=launch.cfg.world_size,
        entry=[sys.executable, "-m", "moe_parallel.train.entry", str(launch.run_dir)],
        env=dict(env or {}),
        threads_per_rank=threads_per_rank,
    )
    return run_local(spec, stream=stream)
