"""Checkpoint benchmark: blocking time of an async save over a synchronous save of the same
state (same run, alternating), and save / load throughput in MB/s. Headline last:
``async_blocking_ratio=<(median start + median publish) / median sync save>`` (goal: <= 0.05).
Training waits for an async save at its start (plan, fork) and in the polls after the writers end
(Megatron's finalize; rank 0 then publishes in a thread): both are counted. The small all-reduce of
each step's poll while the writers run is printed apart."""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch


def _rank_main(run_dir: Path, repeats: int) -> None:
    from moe_parallel.runtime.quiet import quiet_expected_warnings

    quiet_expected_warnings()
    from moe_parallel.runtime import cpu_adapter as device_adapter
    from moe_parallel.config import load_config

    cfg = load_config(run_dir / "config.yaml")
    os.environ["MOE_PARALLEL_DEVICE"] = "cpu"
    device_adapter.activate()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from moe_parallel.ckpt.async_save import AsyncSaver
    from moe_parallel.ckpt.checkpoint import Progress, load_checkpoint, save_checkpoint
    from moe_parallel.ckpt.manifest import read_manifest
    from moe_parallel.data import prepare
    from moe_parallel.runtime.distributed import init_distributed, shutdown_distributed
    from moe_parallel.model.build import build_train_objects

    info = init_distributed(cfg, "cpu")
    prepared = prepare(cfg.data)
    objs = build_train_objects(cfg, prepared.vocab_size,
                               on_cpu=True)
    root = run_dir / "bench-checkpoints"
    saver = AsyncSaver(timeout_s=600)
    sync_s, blocked_s, load_s, publish_s, poll_s = [], [], [], [], []
    step = 0
    for _ in range(repeats):
        step += 1
        torch.distributed.barrier()
        t = time.perf_counter()
        path = save_checkpoint(root, objs, Progress(step, 0), cfg)
        sync_s.append(time.perf_counter() - t)
        torch.distributed.barrier()
        t = time.perf_counter()
        load_checkpoint(path, objs, cfg)
        load_s.append(time.perf_counter() - t)
        step += 1
        blocked_s.append(saver.start(root, objs, Progress(step, 0), cfg, None))
        # Training polls after every step: while the writers run, each poll is one small
        # all-reduce; the poll that finds them done starts rank 0's publish, later polls learn
        # its end. Timed: one poll during the writes, then every poll from the writers' end
        # until the checkpoint is published (10 ms apart, standing for training steps).
        t = time.perf_counter()
        published, _ = saver.poll()
        poll_s.append(time.perf_counter() - t)
        process = getattr(saver.queue.async_calls[-1].async_caller, "process", None)
        while process is not None and process.is_alive():
            time.sleep(0.005)
        torch.distributed.barrier()
        in_polls = 0.0
        while published is None:
            t = time.perf_counter()
            published, _ = saver.poll()
            in_polls += time.perf_counter() - t
            time.sleep(0.01)
        publish_s.append(in_polls)
    saver.close()
    size = sum(read_manifest(path)["chunk_file_sizes"].values())
    if info.is_logger:
        sync, blocked, load, publish, poll = (
            statistics.median(x) for x in (sync_s, blocked_s, load_s, publish_s, poll_s))
        print(f"ranks={cfg.world_size} checkpoint_MB={size / 1e6:.1f} repeats={repeats}")
        print(f"sync_save_s={sync:.3f} save_MB_per_s={size / 1e6 / sync:.1f}")
        print(f"load_s={load:.3f} load_MB_per_s={size / 1e6 / load:.1f}  (includes verification)")
        print(f"async_start_s={blocked:.3f} (first save, which plans and validates: "
              f"{blocked_s[0]:.3f}; each: {' '.join(f'{b:.3f}' for b in blocked_s)})")
        print(f"async_publish_s={publish:.3f}  (in the polls from the writers' end to the "
              f"published checkpoint; rank 0 publishes in a thread)")
        print(f"poll_while_writing_s={poll:.4f}  (each step's poll while the writers run)")
        print(f"async_blocking_s={blocked + publish:.3f}")
        print(f"async_blocking_ratio={(blocked + publish) / sync:.3f}", flush=True)
        shutil.rmtree(root)
    shutdown_distributed()


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]), int(sys.argv[2]))
