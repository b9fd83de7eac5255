"""Overhead benchmark: moectl's training step against a bare Megatron-core step, same run.

Both kinds of step drive the same model, optimizer and batches; they alternate in blocks so that
drift (warm-up, caches, other load) hits both alike, and the median step time of each is taken.
The bare step is what a hand-written Megatron-core loop does: zero grads, forward-backward
schedule, scheduler and optimizer step. moectl's step is the Trainer's ``train_step``, which adds
what the real loop adds: the global loss reduction, expert-load counting and reduction, the
metrics record and its JSONL line (monitoring off: ``bench/monitor_overhead.py`` measures it).
Printed last: ``overhead_ratio=<moectl median / bare median>``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moe_parallel.bench.common import run_rank, step_at

if TYPE_CHECKING:
    from moe_parallel.train.trainer import Trainer


def measure(trainer: Trainer, run_dir: Path, repeats: int) -> None:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from moe_parallel.train.step import forward_step

    cfg, objs, batches = trainer.cfg, trainer.train_objects, trainer.batches
    S, B = cfg.model.seq_length, cfg.train.micro_batch_size

    def bare(step: int) -> None:
        for chunk in objs.model:
            chunk.zero_grad_buffer()
        objs.optimizer.zero_grad()
        its = batches.iterators(step, len(objs.model))
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=its if len(its) > 1 else its[0],
            model=objs.model,
            num_microbatches=batches.num_microbatches,
            seq_length=S,
            micro_batch_size=B,
            forward_only=False,
        )
        objs.scheduler.step(increment=1)
        objs.optimizer.step()

    def ours(step: int) -> None:
        step_at(trainer, step)

    times = {"bare": [], "moectl": []}
    step, block = 0, 3
    for _ in range(repeats):
        for name, fn in (("bare", bare), ("moectl", ours)):
            for _ in range(block):
                torch.distributed.barrier()
                started = time.perf_counter()
                fn(step % cfg.train.steps)
                times[name].append(time.perf_counter() - started)
                step += 1
    if trainer.expert_load is not None:
        trainer.expert_load.collect(batches.num_microbatches)  # drain counts left by bare steps
    trainer.metrics.close()
    if trainer.info.is_logger:
        _report(cfg, times, block)


def _report(cfg, times: dict, warmup: int) -> None:
    bare = statistics.median(times["bare"][warmup:])
    ours = statistics.median(times["moectl"][warmup:])
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    print(f"ranks={cfg.world_size} layout={cfg.parallel.model_dump(exclude_none=True)}")
    print(f"bare_megatron_step_s={bare:.4f} bare_tokens_per_s={tokens / bare:.0f}")
    print(f"moectl_step_s={ours:.4f} moectl_tokens_per_s={tokens / ours:.0f}")
    print(f"samples_per_kind={len(times['bare']) - warmup}")
    print(f"overhead_ratio={ours / bare:.4f}", flush=True)


if __name__ == "__main__":
    run_rank(measure, overrides=["monitor.enabled=false"])
