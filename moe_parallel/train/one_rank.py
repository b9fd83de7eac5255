"""Programs that work on whole models in one process: the BTX mix and held-out evaluation.

They build the model on a single rank (every parallel size 1), which any checkpoint loads into
(checkpoints reshard), and run as a 1-rank job of the local backend, so their logs and outcome
are in a run directory like any run's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import torch

from moe_parallel.runtime import cpu_adapter as device_adapter
from moe_parallel.config import RunConfig, load_config, resolve_device
from moe_parallel.runtime.quiet import quiet_expected_warnings

ONE_RANK = ["parallel.tensor=1", "parallel.pipeline=1", "parallel.virtual_pipeline=null",
            "parallel.context=1", "parallel.expert=1", "parallel.data=1",
            "parallel.sequence_parallel=false"]
# Loading weights only: the optimizer moments of another layout are not needed.
WEIGHTS_ONLY = ["checkpoint.on_layout_change=reset_optimizer"]


def one_rank_config(path: str | Path, extra: list[str] = ()) -> RunConfig:
    return load_config(path, [*ONE_RANK, *extra])


def start(cfg: RunConfig) -> bool:
    """Join the 1-rank process group; True when on CPU."""
    from moe_parallel.runtime.distributed import init_distributed

    device = resolve_device(cfg, torch.cuda.is_available() and cfg.train.device != "cpu")
    init_distributed(cfg, device)
    return device == "cpu"


def load_model(cfg: RunConfig, vocab: int, path: Path, on_cpu: bool):
    """A 1-rank model (with optimizer) holding the checkpoint at ``path``."""
    from moe_parallel.ckpt.checkpoint import load_checkpoint
    from moe_parallel.model.build import build_train_objects

    objs = build_train_objects(cfg, vocab, on_cpu=on_cpu)
    load_checkpoint(path, objs, cfg)
    return objs


def parameters(objs) -> dict[str, torch.Tensor]:
    return dict(objs.model[0].module.named_parameters())


def main(program: Callable[[Path], object], usage: str, argv: list[str] | None = None) -> int:
    """``python -m ... RUN_DIR``: run ``program(RUN_DIR)`` with the CPU adapter when needed."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(f"usage: {usage}", file=sys.stderr)
        return 2
    quiet_expected_warnings()
    if not torch.cuda.is_available():
        os.environ["MOE_PARALLEL_DEVICE"] = "cpu"
        device_adapter.activate()
    from moe_parallel.runtime.distributed import shutdown_distributed

    try:
        program(Path(argv[0]))
    finally:
        shutdown_distributed()
    return 0
