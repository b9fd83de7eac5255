"""Overhead benchmark: moectl's training step against a bare Megatron-core step, same run.

Both kinds of step drive the same model, optimizer and batches; they alternate in pairs (AB, BA,
...) so that drift (warm-up, caches, other load) hits both alike, and each pair gives a ratio
moectl / bare; the median ratio and its bootstrap 95% interval are reported, measuring until the
interval's half-width is below the goal's margin (0.02) or the time cap (``common.StopRule``).
The bare step is what a hand-written Megatron-core loop does: zero grads, forward-backward
schedule, scheduler and optimizer step. moectl's step is the Trainer's ``train_step``, which adds
what the real loop adds: the global loss reduction, expert-load counting and reduction, the
metrics record and its JSONL line (monitoring off: ``bench/monitor_overhead.py`` measures it).
Rank arguments: MAX_SECONDS MIN_PAIRS.
Printed last: ``overhead_ratio=<median of the moectl / bare pair ratios>`` (goal: <= 1.02).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from moe_parallel.bench.common import (
    PairedTimes,
    StopRule,
    interleaved_pairs,
    report_interval,
    run_rank,
    step_at,
)

if TYPE_CHECKING:
    from moe_parallel.train.trainer import Trainer

GOAL = 1.02


def measure(trainer: Trainer, run_dir: Path, args: list[str]) -> None:
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

    def run(kind: str, step: int) -> None:
        if kind == "bare":
            bare(step % cfg.train.steps)
        else:
            step_at(trainer, step)

    rule = StopRule(margin=GOAL - 1, max_seconds=float(args[0]), min_pairs=int(args[1]))
    times = interleaved_pairs(run, ("bare", "moectl"), rule)
    if trainer.expert_load is not None:
        trainer.expert_load.collect(batches.num_microbatches)  # drain counts left by bare steps
    trainer.metrics.close()
    if trainer.info.is_logger:
        _report(cfg, times)


def _report(cfg, times: PairedTimes) -> None:
    bare, ours = statistics.median(times.a), statistics.median(times.b)
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    print(f"ranks={cfg.world_size} layout={cfg.parallel.model_dump(exclude_none=True)}")
    print(f"bare_megatron_step_s={bare:.4f} bare_tokens_per_s={tokens / bare:.0f}")
    print(f"moectl_step_s={ours:.4f} moectl_tokens_per_s={tokens / ours:.0f}")
    print(f"pairs={len(times.a)} ratio_of_medians={ours / bare:.4f}")
    report_interval("overhead_ratio", times)


if __name__ == "__main__":
    run_rank(measure, overrides=["monitor.enabled=false"])
