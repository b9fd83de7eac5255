"""Launcher side of ``moectl train``: config -> checks -> run directory -> local backend.

Everything a user can get wrong is checked here, before any rank starts: the config, the
device (FP8 without Transformer Engine, CUDA asked for on a CPU machine), the rank count, and
the data (prepared here, with progress, so ranks only read a finished cache).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from cluster import Backend, RunHandle, RunLayout, RunSpec, new_run_dir, run_local
from cluster.profile import load_profile, split_overrides
from cluster.ray_backend import RayBackend, check_capacity
from cluster.slurm import SlurmBackend, check_profile
from .config import RunConfig, check_world_size, dump_config, load_config, resolve_device
from .data import prepare


@dataclass
class TrainLaunch:
    cfg: RunConfig
    run_dir: Path


def plan_train(config_path: str | Path | None, overrides: Iterable[str], runs_root: str | None,
               resume_dir: str | None, nproc: int | None, gpus: bool | None = None,
               check: Callable[[RunConfig], None] | None = None) -> TrainLaunch:
    """Validate everything and create (or reopen) the run directory; starts nothing.

    ``gpus``: whether the ranks will have GPUs (None: this machine's answer). ``check``: more
    validation (e.g. the cluster profile against the live cluster) before the run directory
    is created.
    """
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
    resolve_device(cfg, torch.cuda.is_available() if gpus is None else gpus)
    if check is not None:
        check(cfg)
    if cfg.finetune is None:
        prepare(cfg.data)  # fails here, with the path named, rather than on every rank
    else:  # pack the instruction examples once, before any rank starts
        from moe_parallel.data.packing import packed_dir, tokenizer_only

        packed_dir(cfg, tokenizer_only(cfg).tokenizer_path)
    if run_dir is None:
        run_dir = new_run_dir(Path(runs_root) if runs_root else None, cfg.name)
    RunLayout(run_dir).config.write_text(dump_config(cfg))
    return TrainLaunch(cfg, run_dir)


def rank_spec(launch: TrainLaunch, threads_per_rank: int | None = None,
              env: dict[str, str] | None = None) -> RunSpec:
    """What every backend runs: the training entry on each rank of the layout."""
    return RunSpec(
        run_dir=launch.run_dir,
        world_size=launch.cfg.world_size,
        entry=[sys.executable, "-m", "moe_parallel.train.entry", str(launch.run_dir)],
        env=dict(env or {}),
        threads_per_rank=threads_per_rank,
        hang_timeout_s=launch.cfg.monitor.hang_timeout if launch.cfg.monitor.enabled else None,
    )


def launch_local(launch: TrainLaunch, stream: bool = True, threads_per_rank: int | None = None,
                 env: dict[str, str] | None = None) -> int:
    return run_local(rank_spec(launch, threads_per_rank, env), stream=stream)


@dataclass
class Submitted:
    launch: TrainLaunch
    backend: Backend
    handle: RunHandle


def submit_run(config_path: str | Path | None, overrides: Iterable[str], cluster: str | None,
               backend_name: str | None, runs_root: str | None, resume_dir: str | None,
               threads_per_rank: int | None = None, env: dict[str, str] | None = None) -> Submitted:
    """``moectl submit``: config + cluster profile -> checks -> run directory -> a queued job.

    Overrides whose first part names a profile section (``slurm.nodes=2``, ``ray.strategy=SPREAD``)
    change the profile; the others change the run config. Every check (config, profile, the live
    cluster: SLURM's partitions and nodes, Ray's reachability, token and resources) runs before
    the run directory is created or anything is queued.
    """
    run_overrides, profile_overrides = split_overrides(overrides)
    if backend_name is not None:
        profile_overrides.append(f"backend={backend_name}")
    profile = load_profile(cluster, profile_overrides)
    if profile.backend == "slurm":
        backend, gpus = SlurmBackend(profile.slurm), profile.slurm.gpus_per_node > 0

        def check(cfg: RunConfig) -> None:
            profile.slurm.ranks_on_each_node(cfg.world_size)
            check_profile(profile.slurm)
    elif profile.backend == "ray":
        backend, gpus = RayBackend(profile.ray), profile.ray.gpus_per_rank > 0

        def check(cfg: RunConfig) -> None:
            check_capacity(profile.ray, cfg.world_size)
    else:
        raise ValueError(f"moectl submit supports the backends slurm and ray (got "
                         f"{profile.backend!r}); use `moectl train` for local ranks")
    launch = plan_train(config_path, run_overrides, runs_root, resume_dir, nproc=None,
                        gpus=gpus, check=check)
    return Submitted(launch, backend, backend.submit(rank_spec(launch, threads_per_rank, env)))
