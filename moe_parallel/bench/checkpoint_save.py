"""Checkpoint benchmark: blocking time of an async save over a synchronous save of the same
state (same run, alternating), and save / load throughput in MB/s. Headline last:
``async_blocking_ratio=<(median start + median publish) / median sync save>`` (goal: <= 0.05).
Training waits for an async save at its start (plan, fork) and in the polls after the writers end
(Megatron's finalize; rank 0 then publishes in a thread): both are counted. The small all-reduce of
each step's poll while the writers run is printed apart. Rank arguments: REPEATS [FIGURES.json]:
with the second, the first rank also writes its headline figures there as JSON.

The state is a Trainer's (model, optimizer, schedule); the saves are timed on the save
mechanisms themselves (``save_checkpoint``, ``AsyncSaver``), below the checkpoint manager."""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moe_parallel.bench.common import run_rank

if TYPE_CHECKING:
    from moe_parallel.train.trainer import Trainer


def measure(trainer: Trainer, run_dir: Path, args: list[str]) -> None:
    from moe_parallel.ckpt.async_save import AsyncSaver
    from moe_parallel.ckpt.checkpoint import Progress, load_checkpoint, save_checkpoint
    from moe_parallel.ckpt.manifest import read_manifest

    repeats = int(args[0])
    cfg, objs = trainer.cfg, trainer.train_objects
    root = run_dir / "bench-checkpoints"  # shared by the ranks: the run directory, not scratch
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
    if trainer.info.is_logger:
        figures = _report(cfg, size, repeats, sync_s, blocked_s, load_s, publish_s, poll_s)
        if len(args) > 1:
            Path(args[1]).write_text(json.dumps(figures))
        shutil.rmtree(root)


def _report(
    cfg, size: int, repeats: int, sync_s, blocked_s, load_s, publish_s, poll_s
) -> dict[str, float]:
    """Print the figures, headline last; return the ones the goodput simulator reads."""
    sync, blocked, load, publish, poll = (
        statistics.median(x) for x in (sync_s, blocked_s, load_s, publish_s, poll_s)
    )
    print(f"ranks={cfg.world_size} checkpoint_MB={size / 1e6:.1f} repeats={repeats}")
    print(f"sync_save_s={sync:.3f} save_MB_per_s={size / 1e6 / sync:.1f}")
    print(f"load_s={load:.3f} load_MB_per_s={size / 1e6 / load:.1f}  (includes verification)")
    print(
        f"async_start_s={blocked:.3f} (first save, which plans and validates: "
        f"{blocked_s[0]:.3f}; each: {' '.join(f'{b:.3f}' for b in blocked_s)})"
    )
    print(
        f"async_publish_s={publish:.3f}  (in the polls from the writers' end to the "
        f"published checkpoint; rank 0 publishes in a thread)"
    )
    print(f"poll_while_writing_s={poll:.4f}  (each step's poll while the writers run)")
    print(f"async_blocking_s={blocked + publish:.3f}")
    ratio = (blocked + publish) / sync
    print(f"async_blocking_ratio={ratio:.3f}", flush=True)
    return {
        "async_blocking_ratio": round(ratio, 3),
        "sync_save_s": round(sync, 3),
        "async_blocking_s": round(blocked + publish, 3),
        "state_bytes": float(size),
        "ranks": cfg.world_size,
    }


if __name__ == "__main__":
    run_rank(measure, overrides=["monitor.enabled=false"])
