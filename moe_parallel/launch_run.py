"""Launcher side of ``moectl train`` and ``moectl submit``: config -> checks -> run directory ->
backend (local ranks, or the cluster profile's backend: SLURM, Ray).

Everything a user can get wrong is checked here, before any rank starts: the config, the
device (FP8 without Transformer Engine, CUDA asked for on a CPU machine), the rank count, the
cluster (the backend's own check against the live cluster), and the data (prepared here, with
progress, so ranks only read a finished cache). The config and the cluster profile are each
loaded once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from cluster import (
    Backend,
    RunHandle,
    RunLayout,
    RunSpec,
    backend_for_profile,
    new_run_dir,
    run_local,
)
from cluster.backend import QueuedBackend
from cluster.profile import load_profile, split_overrides

from .config import RunConfig, check_world_size, dump_config, load_config, resolve_device
from .config.recovery import elastic_spec
from .data import prepare
from .runtime.bootstrap import local_rank_preload


@dataclass
class TrainLaunch:
    cfg: RunConfig
    run_dir: Path


def load_run_config(
    config_path: str | Path | None, overrides: Iterable[str], resume_dir: str | Path | None
) -> tuple[RunConfig, Path | None]:
    """The run config and the run directory continued (None: a new run). A continued run reads
    its own ``config.yaml`` unless ``config_path`` is given."""
    if resume_dir is not None:
        run_dir = Path(resume_dir)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
        return load_config(config_path or run_dir / "config.yaml", overrides), run_dir
    if config_path is None:
        raise ValueError("a config file is required (or --resume RUN_DIR)")
    return load_config(config_path, overrides), None


def plan_train(
    config_path: str | Path | None,
    overrides: Iterable[str],
    runs_root: str | None,
    resume_dir: str | None,
    nproc: int | None,
    gpus: bool | None = None,
    check: Callable[[RunConfig], None] | None = None,
) -> TrainLaunch:
    """Load the config, validate everything and create (or reopen) the run directory; starts
    nothing. See :func:`prepare_run`."""
    cfg, run_dir = load_run_config(config_path, overrides, resume_dir)
    return prepare_run(cfg, run_dir, runs_root, nproc, gpus, check)


def prepare_run(
    cfg: RunConfig,
    run_dir: Path | None,
    runs_root: str | None,
    nproc: int | None,
    gpus: bool | None = None,
    check: Callable[[RunConfig], None] | None = None,
) -> TrainLaunch:
    """Validate everything and create (``run_dir`` None) or reopen the run directory.

    ``gpus``: whether the ranks will have GPUs (None: this machine's answer). ``check``: more
    validation (e.g. the cluster profile against the live cluster) before the run directory
    is created.
    """
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


def rank_spec(
    launch: TrainLaunch, threads_per_rank: int | None = None, env: dict[str, str] | None = None
) -> RunSpec:
    """What every backend runs: the training entry on each rank of the layout."""
    return RunSpec(
        run_dir=launch.run_dir,
        world_size=launch.cfg.world_size,
        entry=[sys.executable, "-m", "moe_parallel.train.entry", str(launch.run_dir)],
        env=dict(env or {}),
        threads_per_rank=threads_per_rank,
        hang_timeout_s=launch.cfg.monitor.hang_timeout if launch.cfg.monitor.enabled else None,
        elastic=elastic_spec(launch.cfg),
        preload=local_rank_preload(launch.cfg.train.device),
    )


def launch_local(
    launch: TrainLaunch,
    stream: bool = True,
    threads_per_rank: int | None = None,
    env: dict[str, str] | None = None,
) -> int:
    return run_local(rank_spec(launch, threads_per_rank, env), stream=stream)


@dataclass
class Submission:
    """A run to start on a backend: its config, the run directory it continues (None: a new
    run), and the backend, already configured (by the cluster profile)."""

    cfg: RunConfig
    resume_dir: Path | None
    backend: Backend


@dataclass
class Submitted:
    launch: TrainLaunch
    backend: Backend
    handle: RunHandle


def load_submission(
    config_path: str | Path | None,
    overrides: Iterable[str],
    cluster: str | None,
    backend_name: str | None,
    resume_dir: str | None,
) -> Submission:
    """``moectl submit``'s inputs, each loaded once: the cluster profile (``backend_name``
    overrides its backend) chooses and configures the backend, then the run config.

    Overrides whose first part names a profile section (``slurm.nodes=2``, ``ray.strategy=SPREAD``)
    change the profile; the others change the run config.
    """
    run_overrides, profile_overrides = split_overrides(overrides)
    if backend_name is not None:
        profile_overrides.append(f"backend={backend_name}")
    backend = backend_for_profile(load_profile(cluster, profile_overrides))
    if isinstance(backend, QueuedBackend):  # a scheduler's job, not ranks of this process
        cfg, run_dir = load_run_config(config_path, run_overrides, resume_dir)
        return Submission(cfg, run_dir, backend)
    raise ValueError(
        f"moectl submit supports the backends slurm and ray (got {backend.name!r}); "
        "use `moectl train` for local ranks"
    )


def start_run(
    submission: Submission,
    runs_root: str | None,
    threads_per_rank: int | None = None,
    env: dict[str, str] | None = None,
) -> Submitted:
    """Checks -> run directory -> the backend's ``submit``. Every check (config, device, the
    backend's own against the live cluster: SLURM's partitions and nodes, Ray's reachability,
    token and resources) runs before the run directory is created or anything is queued."""
    backend = submission.backend
    launch = prepare_run(
        submission.cfg,
        submission.resume_dir,
        runs_root,
        nproc=None,
        gpus=backend.ranks_have_gpus,
        check=lambda cfg: check_backend(backend, cfg),
    )
    return Submitted(launch, backend, backend.submit(rank_spec(launch, threads_per_rank, env)))


def check_backend(backend: Backend, cfg: RunConfig) -> None:
    """The backend's own checks against the live cluster, and an elastic run's model-parallel
    group against its nodes: a shrunk run keeps that group, so one node must hold it."""
    backend.check_submission(cfg.world_size)
    elastic = elastic_spec(cfg)
    if elastic is None:
        return
    per_node = backend.ranks_per_node_at_most(cfg.world_size)
    if per_node is not None and elastic.ranks_per_replica > per_node:
        p = cfg.parallel
        raise ValueError(
            f"recovery.mode=elastic: the model-parallel group (parallel.tensor x pipeline x "
            f"context = {p.tensor} x {p.pipeline} x {p.context} = {elastic.ranks_per_replica} "
            f"ranks) is larger than one node of the {backend.name} cluster holds ({per_node} "
            "ranks): use recovery.mode=restart, or a smaller model-parallel group"
        )


def submit_run(
    config_path: str | Path | None,
    overrides: Iterable[str],
    cluster: str | None,
    backend_name: str | None,
    runs_root: str | None,
    resume_dir: str | None,
    threads_per_rank: int | None = None,
    env: dict[str, str] | None = None,
) -> Submitted:
    """``moectl submit`` in one call: :func:`load_submission`, then :func:`start_run`."""
    submission = load_submission(config_path, overrides, cluster, backend_name, resume_dir)
    return start_run(submission, runs_root, threads_per_rank, env)
