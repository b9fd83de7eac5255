"""Overhead benchmark: moectl's training step against a bare Megatron-core step, same run.

Both kinds of step drive the same model, optimizer and batches; they alternate in blocks so that
drift (warm-up, caches, other load) hits both alike, and the median step time of each is taken.
The bare step is what a hand-written Megatron-core loop does: zero grads, forward-backward
schedule, scheduler and optimizer step. moectl's step adds what the real loop adds: the global
loss reduction, expert-load counting and reduction, the metrics record and its JSONL line.
Printed last: ``overhead_ratio=<moectl median / bare median>``.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def run_benchmark(config: str, overrides: list[str], repeats: int,
                  module: str = "moe_parallel.bench.step_overhead") -> int:
    """Launcher side: validate, then run ``module`` (this one by default) on local ranks."""
    from cluster import RunSpec, run_local
    from moe_parallel.launch_run import plan_train

    launch = plan_train(config, [*overrides, "checkpoint.save_at_end=false",
                                 "log.tensorboard=false"], None, None, nproc=None)
    spec = RunSpec(run_dir=launch.run_dir, world_size=launch.cfg.world_size,
                   entry=[sys.executable, "-m", module, str(launch.run_dir),
                          str(repeats)])
    return run_local(spec, stream=True)


def _rank_main(run_dir: Path, repeats: int) -> None:
    from moe_parallel.runtime import cpu_adapter as device_adapter
    from moe_parallel.config import load_config
    from moe_parallel.runtime.quiet import quiet_expected_warnings

    quiet_expected_warnings()
    cfg = load_config(run_dir / "config.yaml")
    os.environ["MOE_PARALLEL_DEVICE"] = "cpu"
    device_adapter.activate()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from moe_parallel.data import prepare
    from moe_parallel.runtime.distributed import init_distributed, shutdown_distributed
    from moe_parallel.train.loop import _expert_load, _one_step, _step_batches
    from moe_parallel.train.metrics import MetricsWriter
    from moe_parallel.model.build import build_train_objects
    from moe_parallel.train.step import forward_step
    from moe_parallel.ckpt.checkpoint import Progress

    info = init_distributed(cfg, "cpu")
    prepared = prepare(cfg.data)
    objs = build_train_objects(cfg, prepared.vocab_size,
                               on_cpu=True)
    batches = _step_batches(cfg, prepared, info)
    writer = MetricsWriter(Path(tempfile.mkdtemp()), tensorboard=False, enabled=info.is_logger)
    moe = _expert_load(cfg, objs, info)
    S, B = cfg.model.seq_length, cfg.train.micro_batch_size
    quiet = lambda message: None

    def bare(step: int) -> None:
        for chunk in objs.model:
            chunk.zero_grad_buffer()
        objs.optimizer.zero_grad()
        its = batches.iterators(step, len(objs.model))
        get_forward_backward_func()(forward_step_func=forward_step,
                                    data_iterator=its if len(its) > 1 else its[0],
                                    model=objs.model, num_microbatches=batches.num_microbatches,
                                    seq_length=S, micro_batch_size=B, forward_only=False)
        objs.scheduler.step(increment=1)
        objs.optimizer.step()

    def ours(step: int) -> None:
        _one_step(cfg, objs, batches, moe, Progress(step, 0), writer, quiet)

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
    if moe is not None:
        moe.collect(batches.num_microbatches)  # drain counts left by the bare steps
    writer.close()
    if info.is_logger:
        _report(cfg, times, block)
    shutdown_distributed()


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
    _rank_main(Path(sys.argv[1]), int(sys.argv[2]))
