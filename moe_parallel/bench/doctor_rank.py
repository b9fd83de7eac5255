"""Rank side of ``moectl doctor`` (``bench/doctor.py`` launches it): one job per run,

    python -m moe_parallel.bench.doctor_rank JOB DEVICE RUN_DIR [CHECKPOINT]

JOB is ``step`` (training steps of RUN_DIR/config.yaml: the first step's loss, the median step
time, MFU, the planner's prediction, the step clock), ``te`` (Transformer Engine's layer spec
against the local spec on the same weights), ``save`` (a few steps, then an async checkpoint save
and the saved weights as reference tensors) or ``load`` (CHECKPOINT loaded, its weights compared
with the reference). Rank 0 writes the job's figures to RUN_DIR/doctor.json.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moe_parallel.bench.common import start_trainer

if TYPE_CHECKING:
    from moe_parallel.config import RunConfig
    from moe_parallel.train.trainer import Trainer

RESULT = "doctor.json"
REFERENCE = "reference_weights.pt"  # the saved weights, next to the checkpoints


def main(argv: list[str]) -> None:
    from moe_parallel.runtime.bootstrap import stop_rank

    job, device, run_dir = argv[0], argv[1], Path(argv[2])
    if job == "te":
        figures = te_against_local(run_dir, device)
    else:
        overrides = {
            "save": [f"checkpoint.dir={run_dir / 'checkpoints'}"],
            "load": [f"checkpoint.resume={argv[3] if len(argv) > 3 else ''}"],
        }
        trainer = start_trainer(run_dir, overrides.get(job, []), device=device)
        jobs = {"step": training_steps, "save": save_async, "load": compare_loaded}
        figures = jobs[job](trainer, run_dir)
        trainer.metrics.close()
    if torch.distributed.get_rank() == 0:
        (run_dir / RESULT).write_text(json.dumps(figures))
    stop_rank()


def training_steps(trainer: Trainer, run_dir: Path) -> dict:
    """Every step of the run: the first one's loss, then the median of the others' times (the
    second step onwards: the first includes one-time set-up), with MFU and the planner's
    prediction; the step clock's span (compute + communication) over the step time."""
    from moe_parallel.bench.doctor_figures import (
        matmul_flops_per_s,
        planner_step_seconds,
        train_flops_per_step,
    )
    from moe_parallel.plan.hardware import shipped_profile_for
    from moe_parallel.views.mfu import peak_flops

    cfg = trainer.cfg
    records = [trainer.train_step() for _ in range(cfg.train.steps)]
    timed = records[1:]
    step_s = statistics.median(r["step_time_s"] for r in timed)
    vocab = trainer.train_objects.padded_vocab_size
    on_gpu = trainer.device.type == "cuda"
    datasheet = peak_flops(torch.cuda.get_device_name(), cfg.train.precision) if on_gpu else None
    peak = datasheet or matmul_flops_per_s(trainer.device, cfg.train.precision)
    flops = train_flops_per_step(cfg, vocab)
    # The planner needs a hardware profile: the shipped one of this GPU; none for a CPU (its
    # profile comes from `moectl plan calibrate`, minutes of measurements).
    profile = shipped_profile_for(torch.cuda.get_device_name()) if on_gpu else None
    clock = [
        (r["rank_compute_s"][0] + r["rank_comm_s"][0]) / r["step_time_s"]
        for r in timed
        if "rank_compute_s" in r
    ]
    return {
        "loss": records[0]["lm_loss"],
        "losses_finite": all(math.isfinite(r["lm_loss"]) for r in records),
        "steps": len(records),
        "step_s": step_s,
        "tokens_per_s": cfg.train.global_batch_size * cfg.model.seq_length / step_s,
        "layers": cfg.model.num_layers,
        "peak_flops": peak,
        "peak_from": "datasheet" if datasheet else "measured matmul",
        "mfu": flops / (step_s * peak),
        "planner_profile": profile.name if profile else None,
        "planner_step_s": planner_step_seconds(cfg, vocab, profile) if profile else None,
        "clock": "cuda events" if on_gpu else "host",
        "clock_over_step": statistics.median(clock) if clock else None,
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
    }


def save_async(trainer: Trainer, run_dir: Path) -> dict:
    """Train, save the step asynchronously (checkpoint.async_save), wait for it; the saved
    weights go next to it as reference tensors (on the CPU, by parameter name)."""
    from moe_parallel.ckpt.checkpoint import latest_checkpoint

    for _ in range(trainer.cfg.train.steps):
        trainer.train_step()
    started = time.perf_counter()
    trainer.checkpoints.save(trainer.progress)
    blocked_s = time.perf_counter() - started
    trainer.checkpoints.wait()
    total_s = time.perf_counter() - started
    weights = {
        n: p.detach().cpu() for n, p in trainer.train_objects.model[0].module.named_parameters()
    }
    root = Path(trainer.cfg.checkpoint.dir)
    if torch.distributed.get_rank() == 0:
        torch.save(weights, root / REFERENCE)
    saved = latest_checkpoint(root)
    return {
        "device": trainer.device.type,
        "blocked_s": blocked_s,
        "save_s": total_s,
        "checkpoint": str(saved) if saved else None,
        "tensors": len(weights),
    }


def compare_loaded(trainer: Trainer, run_dir: Path) -> dict:
    """The loaded weights against the reference, tensor by tensor (expert tensors by their
    global expert number: each expert-parallel rank holds a slice of the experts)."""
    from megatron.core import parallel_state

    from moe_parallel.bench.doctor_figures import global_expert_name, local_name_of

    if trainer.resumed_from is None:
        raise RuntimeError("the load job loaded no checkpoint (checkpoint.resume was not found)")
    saved = torch.load(trainer.resumed_from.parent / REFERENCE, weights_only=True)
    reference = {local_name_of(k): v for k, v in saved.items()}  # a TE-spec save (GPU ranks)
    moe = trainer.cfg.model.moe
    ep, ep_rank = trainer.cfg.parallel.expert, parallel_state.get_expert_model_parallel_rank()
    local = moe.num_experts // ep if moe else 0
    compared, differ, missing = 0, [], []
    for name, param in trainer.train_objects.model[0].module.named_parameters():
        key = global_expert_name(name, ep_rank * local) if moe else name
        if key not in reference:
            missing.append(key)
            continue
        compared += 1
        if not torch.equal(param.detach().cpu(), reference[key]):
            differ.append(key)
    counts = torch.tensor([compared, len(differ), len(missing)])
    torch.distributed.all_reduce(counts)
    return {
        "device": trainer.device.type,
        "ranks": torch.distributed.get_world_size(),
        "loaded_step": trainer.progress.step,
        "compared": int(counts[0]),
        "differ": int(counts[1]),
        "missing": int(counts[2]),
        "examples": (differ + missing)[:3],
    }


def te_against_local(run_dir: Path, device: str) -> dict:
    """The model built from Transformer Engine's layer spec and from the local spec, the local
    model's weights copied into the TE one by name; both run the same tokens forward."""
    from moe_parallel.bench.doctor_figures import copy_into_te_model, relative_difference
    from moe_parallel.config import load_config
    from moe_parallel.runtime.bootstrap import prepare_process, start_rank

    prepare_process(device)
    cfg = load_config(run_dir / "config.yaml", ["checkpoint.resume=none"])
    start_rank(cfg, device)
    local, te = (_bare_model(cfg, use_te) for use_te in (False, True))
    copied = copy_into_te_model(local, te)
    S, V = cfg.model.seq_length, cfg.model.vocab_size
    tokens = torch.randint(0, V, (1, S), device="cuda", generator=_generator(cfg.train.seed))
    positions = torch.arange(S, device="cuda").unsqueeze(0)
    with torch.no_grad():
        logits = [m(tokens, positions, None).float() for m in (local, te)]
    return {
        "tensors_copied": copied,
        "relative_difference": relative_difference(logits[1], logits[0]),
        "dtype": str(next(te.parameters()).dtype),
    }


def _bare_model(cfg: RunConfig, use_te: bool):
    from moe_parallel.config.megatron import transformer_config
    from moe_parallel.model.builder import build_model_chunks
    from moe_parallel.model.vocab import padded_vocab_size

    vocab = padded_vocab_size(cfg.model.vocab_size, 1)
    (chunk,) = build_model_chunks(cfg, transformer_config(cfg, on_cpu=False), vocab, use_te)
    return chunk.eval()


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cuda")
    g.manual_seed(seed)
    return g


if __name__ == "__main__":
    main(sys.argv[1:])
