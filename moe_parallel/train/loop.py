"""The training loop of one rank: data, model, resume, steps, metrics, checkpoints."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron.core import parallel_state

from cluster.registry import write_heartbeat

from ..ckpt.checkpoint import (
    Progress,
    SaveFailed,
    discard_partial,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    step_name,
)
from ..ckpt.async_save import AsyncSaver
from ..config import RunConfig
from ..data import build_gpt_datasets, prepare
from ..data.prepare import cache_root
from ..monitor.step_monitor import StepMonitor
from ..monitor import collectives, heartbeat
from ..monitor.run_info import run_info, write_run_info
from moe_parallel.monitor.training_trace import training_trace
from moe_parallel.runtime import faults
from .batches import StepBatches
from moe_parallel.runtime.distributed import RankInfo
from .metrics import MetricsWriter
from .moe_stats import ExpertLoad, imbalance
from .preemption import StopRequest
from moe_parallel.model.build import TrainObjects, build_train_objects
from .evaluate import HeldOutSet
from .step import evaluate_loss, train_step


@dataclass(frozen=True)
class TrainResult:
    progress: Progress
    stopped_by: str | None = None  # the signal that stopped the run early (after a checkpoint)


def train(cfg: RunConfig, run_dir: Path, info: RankInfo) -> TrainResult:
    say = _printer(info)
    prepared = prepare(cfg.data) if cfg.finetune is None else _finetune_tokenizer(cfg)
    objs = build_train_objects(cfg, cfg.model.vocab_size or prepared.vocab_size,
                               on_cpu=info.device == "cpu")
    vocab = objs.padded_vocab_size
    progress, resumed_from = _resume(cfg, run_dir, objs, say)
    batches = _step_batches(cfg, prepared, info)
    writer = MetricsWriter(run_dir, cfg.log.tensorboard, enabled=info.is_logger,
                           wandb=cfg if cfg.log.wandb else None)
    if resumed_from is not None and progress.step < cfg.train.steps:
        _record_resume(cfg, objs, batches, progress, resumed_from, writer, say)
    faults.install_routing([m.module for m in objs.model])  # test-only forced routers
    moe = _expert_load(cfg, objs, info)
    monitor = (StepMonitor(cfg, moe, _device(info), writer, say) if cfg.monitor.enabled
               else None)
    held_out = (HeldOutSet(cfg, prepared, cfg.train.eval_steps, cfg.train.seed, _device(info))
                if cfg.train.eval_interval else None)
    say(f"training {cfg.name}: steps {progress.step}..{cfg.train.steps}, "
        f"{info.world_size} ranks, vocab {vocab}, layout {cfg.parallel.model_dump()}")
    if info.is_logger:  # what the views need (moe_parallel/monitor/views: MFU, device, ranks)
        write_run_info(run_dir, run_info(cfg, vocab, info.device, info.world_size, progress.step))
    saver = _Saver(cfg, _ckpt_root(cfg, run_dir), objs, resumed_from, writer, say)
    stop = StopRequest(_device(info))
    stopped_by = None
    heartbeat.set_step(progress.step)
    if held_out is not None and cfg.finetune is not None and progress.step == 0:
        _evaluate(held_out, objs, 0, writer, say)  # the base model's held-out response loss
    routing = contextlib.ExitStack()  # log.routing_trace: recorded here, saved in `finally`
    try:
        routing.enter_context(training_trace(cfg, run_dir, info.rank,
                                             [m.module for m in objs.model]))
        while progress.step < cfg.train.steps:
            if faults.before_step(progress.step + 1, info.rank):
                collectives.install()  # the armed hang fault fires inside a traced collective
            progress = _one_step(cfg, objs, batches, moe, progress, writer, say, monitor)
            heartbeat.set_step(progress.step)  # read by this rank's heartbeat thread
            if info.is_logger:
                write_heartbeat(run_dir, progress.step)  # what moectl status shows
            faults.after_step(progress.step, info.rank)
            if held_out is not None and _eval_due(cfg, progress.step):
                heartbeat.set_phase("eval")
                _evaluate(held_out, objs, progress.step, writer, say)
            saver.poll()
            stopped_by = stop.agreed()
            if stopped_by is not None:
                _stop_after_checkpoint(saver, progress, stopped_by, writer, say)
                break
            if _save_due(cfg, progress.step):
                saver.save(progress)
        else:
            saver.wait()
            if cfg.checkpoint.save_at_end and not (saver.root / step_name(progress.step)).is_dir():
                # e.g. a run resumed (perhaps under a new layout) at its last step: save it here.
                saver.save(progress)
                saver.wait()
    finally:
        routing.close()
        stop.close()
        saver.close()
        writer.close()
    return TrainResult(progress, stopped_by)


def _stop_after_checkpoint(saver, progress, signal_name, writer, say) -> None:
    """Every rank agreed to stop after this step: make sure a checkpoint of it exists."""
    saver.wait()
    if not (saver.root / step_name(progress.step)).is_dir():
        saver.save(progress)
        saver.wait()
    writer.write({"event": "stopped", "step": progress.step, "signal": signal_name})
    say(f"stopped by {signal_name} after step {progress.step}, checkpoint saved; "
        "exiting so that the run can be requeued")


def _device(info: RankInfo) -> torch.device:
    if info.device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _one_step(cfg, objs, batches, moe, progress, writer, say, monitor=None) -> Progress:
    if monitor is not None:
        monitor.begin_step()
    started = time.perf_counter()
    faults.slow_step(torch.distributed.get_rank())
    heartbeat.set_phase("data")
    result = train_step(objs, batches.iterators(progress.step, len(objs.model)),
                        batches.num_microbatches, cfg.model.seq_length, cfg.train.micro_batch_size)
    loads = moe.collect(batches.num_microbatches) if moe else {}
    elapsed = time.perf_counter() - started
    step = progress.step + 1
    if not math.isfinite(result.lm_loss):
        raise FloatingPointError(f"step {step}: loss is {result.lm_loss}; stopping the run")
    record = {
        "step": step,
        "loss": result.lm_loss,
        "lm_loss": result.lm_loss,
        "lr": result.lr,
        "grad_norm": result.grad_norm,
        "step_time_s": elapsed,
        "tokens_per_s": result.num_tokens / elapsed,
        "num_tokens": result.num_tokens,
        "skipped": result.skipped,
    }
    if loads:
        record.update(_moe_record(loads))
    if monitor is not None:
        record.update(monitor.end_step(step, loads))
    if step % cfg.log.interval == 0 or step == cfg.train.steps:
        writer.write(record)
        say(_summary(record, cfg.train.steps))
    return Progress(step=step, consumed_samples=step * cfg.train.global_batch_size)


class _Saver:
    """Saves checkpoints (synchronously or in the background); a failed save is recorded and
    training goes on with ``latest`` unchanged, up to checkpoint.max_consecutive_failed_saves."""

    def __init__(self, cfg, root, objs, resumed_from, writer, say):
        self.cfg, self.root, self.objs = cfg, root, objs
        self.resumed_from, self.writer, self.say = resumed_from, writer, say
        self.failures_in_a_row = 0
        c = cfg.checkpoint
        self.background = AsyncSaver(c.save_timeout_s) if c.async_save else None

    def save(self, progress: Progress) -> None:
        heartbeat.set_phase("checkpoint")
        try:
            if self.background is not None:
                blocked = self.background.start(self.root, self.objs, progress, self.cfg,
                                                self.resumed_from)
                self.writer.write({"event": "save_started", "step": progress.step,
                                   "blocked_s": blocked})
                return
            path = save_checkpoint(self.root, self.objs, progress, self.cfg,
                                   protect=self.resumed_from)
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
            self.writer.write({"event": "save_stalled", "message": stalled})
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

    def close(self) -> None:
        if self.background is not None:
            self.background.close()

    def _saved(self, path: Path) -> None:
        self.failures_in_a_row = 0
        self.say(f"checkpoint saved: {path}")

    def _failed(self, step: int | None, exc: SaveFailed) -> None:
        self.failures_in_a_row += 1
        latest = latest_checkpoint(self.root) if self.root.is_dir() else None
        self.writer.write({"event": "save_failed", "step": step, "error": str(exc),
                           "latest": latest.name if latest else None,
                           "failures_in_a_row": self.failures_in_a_row})
        self.say(f"CHECKPOINT SAVE FAILED ({self.failures_in_a_row} in a row; latest stays "
                 f"{latest}): {exc}")
        if torch.distributed.get_rank() == 0:
            discard_partial(self.root)
        torch.distributed.barrier()
        limit = self.cfg.checkpoint.max_consecutive_failed_saves
        if self.failures_in_a_row > limit:
            raise SaveFailed(f"{self.failures_in_a_row} checkpoint saves failed in a row "
                             f"(checkpoint.max_consecutive_failed_saves={limit}); last: {exc}")


def _moe_record(loads: dict) -> dict:
    out = {f"moe/{k}": v for k, v in loads.items() if k != "tokens_per_expert"}
    out["moe/tokens_per_expert"] = loads["tokens_per_expert"]
    per_layer = imbalance(loads["tokens_per_expert"])
    out["moe/imbalance"] = per_layer
    if per_layer:
        out["moe/imbalance_max"] = max(per_layer.values())
    if "load_balancing_loss" in loads:
        out["aux_loss"] = loads["load_balancing_loss"]
    return out


def _summary(r: dict, total: int) -> str:
    parts = [f"step {r['step']}/{total}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}"]
    if r.get("grad_norm") is not None:
        parts.append(f"grad {r['grad_norm']:.3f}")
    if "aux_loss" in r:
        parts.append(f"aux {r['aux_loss']:.3f}")
    if "moe/imbalance_max" in r:
        parts.append(f"imbalance {r['moe/imbalance_max']:.2f}")
    parts.append(f"{r['tokens_per_s']:.0f} tok/s")
    parts.append(f"{r['step_time_s'] * 1000:.0f} ms")
    return " | ".join(parts)


def _resume(cfg: RunConfig, run_dir: Path, objs: TrainObjects, say) -> tuple[Progress, Path | None]:
    spec = cfg.checkpoint.resume
    if spec == "none":
        return Progress(), None
    path = latest_checkpoint(_ckpt_root(cfg, run_dir)) if spec == "auto" else Path(spec)
    if path is None and cfg.checkpoint.init_from:
        start = Path(cfg.checkpoint.init_from)
        if not start.is_dir():
            raise FileNotFoundError(f"checkpoint.init_from={start} is not a checkpoint directory")
        load_weights(start, objs, cfg)
        say(f"initialised the weights from {start}; optimizer, LR schedule and step start at 0")
        return Progress(), start
    if path is None:
        return Progress(), None
    progress = load_checkpoint(path, objs, cfg)
    say(f"resumed from {path} at step {progress.step}")
    return progress, path


def _record_resume(cfg, objs, batches, progress, path, writer, say) -> None:
    """The loss of the next batch under the loaded weights: equal to the next step's training
    loss of the run that saved the checkpoint, whatever layout loads it (a reshard check).

    Event "resume" when the run continues its own checkpoint; "init" when it starts from another
    run's weights (checkpoint.init_from), so that a run's resumes are exactly its restarts."""
    loss = evaluate_loss(objs, batches.iterators(progress.step, len(objs.model)),
                         batches.num_microbatches, cfg.model.seq_length, cfg.train.micro_batch_size)
    initialised = cfg.checkpoint.init_from is not None and \
        Path(path) == Path(cfg.checkpoint.init_from)
    writer.write({"event": "init" if initialised else "resume", "step": progress.step,
                  "resume_loss": loss, "checkpoint": str(path)})
    say(f"loss of the next batch after resuming: {loss:.6f}")


def _finetune_tokenizer(cfg: RunConfig):
    from moe_parallel.data.packing import tokenizer_only

    return tokenizer_only(cfg)


def _step_batches(cfg: RunConfig, prepared, info: RankInfo) -> StepBatches:
    total = cfg.train.steps * cfg.train.global_batch_size
    cache = cache_root(cfg.data) / "index-cache"
    if cfg.finetune is not None:  # packed prompt/response examples (finetune/packing.py)
        from moe_parallel.data.packing import finetune_datasets

        train_ds, _ = finetune_datasets(cfg, prepared.tokenizer_path, total, 0)
    else:
        # A collective: Megatron's builder lets rank 0 build the sample index, then the others
        # read it.
        train_ds, _, _ = build_gpt_datasets(
            prepared, cfg.data.split, cfg.model.seq_length, cfg.train.seed, (total, 0, 0),
            str(cache), data_parallel_size=cfg.parallel.data,
        )
    device = torch.device("cuda", torch.cuda.current_device()) if info.device == "cuda" else torch.device("cpu")
    return StepBatches(train_ds, cfg.train.global_batch_size, cfg.train.micro_batch_size,
                       parallel_state.get_data_parallel_rank(),
                       parallel_state.get_data_parallel_world_size(), device)


def _expert_load(cfg: RunConfig, objs: TrainObjects, info: RankInfo) -> ExpertLoad | None:
    if cfg.model.moe is None:
        return None
    device = torch.device("cuda", torch.cuda.current_device()) if info.device == "cuda" else torch.device("cpu")
    return ExpertLoad([m.module for m in objs.model], cfg.model.num_layers,
                      cfg.model.moe.num_experts, device)


def _eval_due(cfg: RunConfig, step: int) -> bool:
    return step % cfg.train.eval_interval == 0 or step == cfg.train.steps


def _evaluate(held_out: HeldOutSet, objs: TrainObjects, step: int, writer, say) -> None:
    loss = held_out.loss(objs)
    writer.write({"event": "eval", "step": step, "valid_loss": loss})
    say(f"step {step}: held-out loss {loss:.4f} ({held_out.num_batches} batches of the "
        "validation split)")


def _save_due(cfg: RunConfig, step: int) -> bool:
    c = cfg.checkpoint
    if step == cfg.train.steps and c.save_at_end:
        return True
    return c.interval is not None and step % c.interval == 0


def _ckpt_root(cfg: RunConfig, run_dir: Path) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"


def _printer(info: RankInfo):
    def say(message: str) -> None:
        if info.is_logger:
            print(message, flush=True)

    return say
