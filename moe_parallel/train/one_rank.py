"""Programs that work on whole models in one process: the BTX mix and held-out evaluation.

They build the model on a single rank (every parallel size 1), which any checkpoint loads into
(checkpoints reshard), and run as a 1-rank job of the local backend, so their logs and outcome
are in a run directory like any run's.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from moe_parallel.config import RunConfig, load_config
from moe_parallel.runtime.bootstrap import machine_device, prepare_process, start_rank, stop_rank

ONE_RANK = [
    "parallel.tensor=1",
    "parallel.pipeline=1",
    "parallel.virtual_pipeline=null",
    "parallel.context=1",
    "parallel.expert=1",
    "parallel.data=1",
    "parallel.sequence_parallel=false",
]
# Loading weights only: the optimizer moments of another layout are not needed.
WEIGHTS_ONLY = ["checkpoint.on_layout_change=reset_optimizer"]


def one_rank_config(path: str | Path, extra: list[str] = ()) -> RunConfig:
    return load_config(path, [*ONE_RANK, *extra])


@dataclass(frozen=True)
class DenseToMoe:
    """A one-rank program that builds an MoE model from dense checkpoints (BTX mix, upcycle)."""

    spec: dict  # the job's JSON file
    dense: RunConfig  # loads weights only, whatever the dense run's layout was
    moe: RunConfig
    vocab: int  # the MoE model's, unpadded
    on_cpu: bool


def start_dense_to_moe(job_file: Path) -> DenseToMoe:
    """Read the job file (``dense_config``, ``moe_config``, ...) and join the 1-rank group."""
    from moe_parallel.model.vocab import model_vocab_size

    spec = json.loads(job_file.read_text())
    dense = one_rank_config(spec["dense_config"], WEIGHTS_ONLY)
    moe = one_rank_config(spec["moe_config"])
    on_cpu = start(moe)
    return DenseToMoe(spec, dense, moe, model_vocab_size(moe), on_cpu)


def start(cfg: RunConfig) -> bool:
    """Join the 1-rank process group; True when on CPU."""
    return start_rank(cfg).device == "cpu"


def load_model(cfg: RunConfig, vocab: int, path: Path, on_cpu: bool):
    """A 1-rank model (with optimizer) holding the checkpoint at ``path``."""
    from moe_parallel.ckpt.checkpoint import load_checkpoint
    from moe_parallel.model.build import build_train_objects

    objs = build_train_objects(cfg, vocab, on_cpu=on_cpu)
    load_checkpoint(path, objs, cfg)
    return objs


def parameters(objs) -> dict[str, torch.Tensor]:
    return dict(objs.model[0].module.named_parameters())


def save_verified(
    out: Path,
    objs,
    cfg: RunConfig,
    vocab: int,
    on_cpu: bool,
    values: dict[str, torch.Tensor],
    program: str,
) -> Path:
    """Save a model whose parameters were set to ``values`` (a BTX mix, an upcycle) and prove
    it: the model holds them before the save, and a fresh model loaded from the checkpoint holds
    them after. The optimizer's main weights follow the model; its moments start at 0."""
    from moe_parallel.ckpt import optimizer_state
    from moe_parallel.ckpt.checkpoint import Progress, save_checkpoint

    optimizer_state.reset_from_model(objs.optimizer)
    require_values(parameters(objs), values, f"{program}: after setting the weights")
    path = save_checkpoint(out, objs, Progress(), cfg)
    fresh = load_model(cfg, vocab, path, on_cpu)
    require_values(parameters(fresh), values, f"{program}: after loading {path} back")
    return path


def require_values(
    params: dict[str, torch.Tensor], values: dict[str, torch.Tensor], when: str
) -> None:
    """The model holds exactly ``values`` (a mix or upcycle must never be silently wrong)."""
    wrong = [n for n, v in values.items() if not torch.equal(params[n].detach(), v)]
    if wrong:
        raise RuntimeError(
            f"{when}: {len(wrong)} parameters differ from the values set (e.g. {wrong[:3]})"
        )


def main(program: Callable[[Path], object], usage: str, argv: list[str] | None = None) -> int:
    """``python -m ... RUN_DIR``: run ``program(RUN_DIR)`` with the CPU adapter when needed."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(f"usage: {usage}", file=sys.stderr)
        return 2
    prepare_process(machine_device())  # before the program imports Megatron
    try:
        program(Path(argv[0]))
    finally:
        stop_rank()
    return 0
