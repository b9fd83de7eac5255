"""The checkpoint policy of a training run: where its checkpoints live, what it resumes from,
when it saves, background saves and their polling, the checkpoint at the end or on a stop
request, and what a failed save does.

Retention (``checkpoint.keep_last`` / ``keep_every``) is applied by each save as it publishes
(:func:`~moe_parallel.ckpt.checkpoint.save_checkpoint`, or the background publish); the manager
hands it the checkpoint the run resumed from so that retention never deletes it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from moe_parallel.config import RunConfig
from moe_parallel.model.build import TrainObjects
from moe_parallel.monitor import heartbeat

from .async_save import AsyncSaver
from .checkpoint import (
    Progress,
    SaveFailed,
    discard_partial,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    step_name,
)

Say = Callable[[str], None]  # a log line (printed by the logging rank)


class EventLog(Protocol):
    """Where the manager records its events: the run's metrics writer (metrics.jsonl)."""

    def write(self, record: dict) -> None: ...


def checkpoint_root(cfg: RunConfig, run_dir: Path) -> Path:
    """``checkpoint.dir`` when set, else RUN_DIR/checkpoints."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"


@dataclass(frozen=True)
class ResumePoint:
    progress: Progress  # where training goes on (step 0 for a fresh run or init_from weights)
    checkpoint: Path | None  # what was loaded: this run's checkpoint, init_from's, or nothing
    load_s: float = 0.0  # seconds the load of this run's own checkpoint took (with a reshard)


def resume_training(cfg: RunConfig, run_dir: Path, objs: TrainObjects, say: Say) -> ResumePoint:
    """Load what ``checkpoint.resume`` names into ``objs`` ("auto": the run's newest checkpoint);
    when it names none, the weights of ``checkpoint.init_from`` (optimizer and step from 0)."""
    spec = cfg.checkpoint.resume
    if spec == "none":
        return ResumePoint(Progress(), None)
    path = latest_checkpoint(checkpoint_root(cfg, run_dir)) if spec == "auto" else Path(spec)
    if path is None and cfg.checkpoint.init_from:
        start = Path(cfg.checkpoint.init_from)
        if not start.is_dir():
            raise FileNotFoundError(f"checkpoint.init_from={start} is not a checkpoint directory")
        load_weights(start, objs, cfg)
        say(f"initialised the weights from {start}; optimizer, LR schedule and step start at 0")
        return ResumePoint(Progress(), start)
    if path is None:
        return ResumePoint(Progress(), None)
    started = time.perf_counter()
    progress = load_checkpoint(path, objs, cfg)
    load_s = time.perf_counter() - started
    say(f"resumed from {path} at step {progress.step} (loaded in {load_s:.1f} s)")
    return ResumePoint(progress, path, load_s)


class CheckpointManager:
    """Saves a run's checkpoints (synchronously, or in the background with
    ``checkpoint.async_save``). A failed save is recorded and training goes on with ``latest``
    unchanged, up to ``checkpoint.max_consecutive_failed_saves`` failures in a row.

    Every method is collective: all ranks call it after the same step."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        objs: TrainObjects,
        events: EventLog,
        say: Say,
        resumed_from: Path | None = None,
    ):
        self.cfg, self.objs, self.events, self.say = cfg, objs, events, say
        self.root = checkpoint_root(cfg, run_dir)
        self.resumed_from = resumed_from  # never deleted by retention
        self.failures_in_a_row = 0
        c = cfg.checkpoint
        self.background = AsyncSaver(c.save_timeout_s) if c.async_save else None

    def save_due(self, step: int) -> bool:
        """``checkpoint.interval`` divides the step, or it is the last one and save_at_end."""
        c = self.cfg.checkpoint
        if step == self.cfg.train.steps and c.save_at_end:
            return True
        return c.interval is not None and step % c.interval == 0

    def has_checkpoint(self, step: int) -> bool:
        return (self.root / step_name(step)).is_dir()

    def save(self, progress: Progress) -> None:
        """Save now (or start a background save); a failure is recorded, see the class."""
        heartbeat.set_phase("checkpoint")
        try:
            if self.background is not None:
                blocked = self.background.start(
                    self.root, self.objs, progress, self.cfg, self.resumed_from
                )
                self.events.write(
                    {"event": "save_started", "step": progress.step, "blocked_s": blocked}
                )
                return
            path = save_checkpoint(
                self.root, self.objs, progress, self.cfg, protect=self.resumed_from
            )
        except SaveFailed as exc:
            self._failed(progress.step, exc)
            return
        self._saved(path)

    def poll(self) -> None:
        """After each step: publish a finished background save, report a stalled one."""
        if self.background is None:
            return
        try:
            path, stalled = self.background.poll()
        except SaveFailed as exc:
            self._failed(None, exc)
            return
        if stalled:
            self.events.write({"event": "save_stalled", "message": stalled})
            self.say(f"CHECKPOINT SAVE STALLED: {stalled}")
        if path is not None:
            self._saved(path)

    def wait(self) -> None:
        """Let a background save finish (and publish it)."""
        if self.background is None:
            return
        try:
            path = self.background.wait()
        except SaveFailed as exc:
            self._failed(None, exc)
            return
        if path is not None:
            self._saved(path)

    def ensure_saved(self, progress: Progress) -> None:
        """Return only once a checkpoint of ``progress.step`` is published (or failed)."""
        self.wait()
        if not self.has_checkpoint(progress.step):
            self.save(progress)
            self.wait()

    def save_at_end(self, progress: Progress) -> None:
        """The loop ran to ``train.steps``: finish a background save, and with
        ``checkpoint.save_at_end`` save the last step if it has no checkpoint yet (e.g. a run
        resumed, perhaps under a new layout, at its last step)."""
        if self.cfg.checkpoint.save_at_end:
            self.ensure_saved(progress)
        else:
            self.wait()

    def close(self) -> None:
        if self.background is not None:
            self.background.close()

    def _saved(self, path: Path) -> None:
        self.failures_in_a_row = 0
        self.say(f"checkpoint saved: {path}")

    def _failed(self, step: int | None, exc: SaveFailed) -> None:
        self.failures_in_a_row += 1
        latest = latest_checkpoint(self.root) if self.root.is_dir() else None
        self.events.write(
            {
                "event": "save_failed",
                "step": step,
                "error": str(exc),
                "latest": latest.name if latest else None,
                "failures_in_a_row": self.failures_in_a_row,
            }
        )
        self.say(
            f"CHECKPOINT SAVE FAILED ({self.failures_in_a_row} in a row; latest stays "
            f"{latest}): {exc}"
        )
        if torch.distributed.get_rank() == 0:
            discard_partial(self.root)
        torch.distributed.barrier()  # no rank saves again before the partial files are gone
        limit = self.cfg.checkpoint.max_consecutive_failed_saves
        if self.failures_in_a_row > limit:
            raise SaveFailed(
                f"{self.failures_in_a_row} checkpoint saves failed in a row "
                f"(checkpoint.max_consecutive_failed_saves={limit}); last: {exc}"
            )
