"""The Trainer: one rank's share of a training run, built from the run's config.

Its components (model and optimizer, step batches, metrics writer, checkpoint manager, expert
load, step monitor, held-out set) are made in ``__init__``; ``train_step`` runs one optimizer
step, ``evaluate`` the held-out loss, ``fit`` the whole run. Every rank of the job builds one and
calls the same methods in the same order: they are collectives.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state

from cluster import registry
from cluster.elastic import GROW, SHRINK, grow_back_requested
from cluster.registry import RunLayout, write_heartbeat
from moe_parallel.ckpt.checkpoint import Progress, layout_of, read_meta
from moe_parallel.ckpt.manager import CheckpointManager, resume_training
from moe_parallel.config import RunConfig
from moe_parallel.data import PreparedData, build_gpt_datasets, prepare
from moe_parallel.data.prepare import cache_root
from moe_parallel.model.build import TrainObjects, build_train_objects
from moe_parallel.monitor import collectives, heartbeat
from moe_parallel.monitor.run_info import run_info, write_run_info
from moe_parallel.monitor.step_monitor import StepMonitor
from moe_parallel.monitor.training_trace import training_trace
from moe_parallel.runtime import faults
from moe_parallel.runtime.distributed import RankInfo

from .batches import StepBatches
from .evaluate import HeldOutSet
from .metrics import MetricsWriter
from .moe_stats import ExpertLoad
from .preemption import StopRequest
from .records import step_record, summary_line
from .step import StepResult, evaluate_loss, schedule_function
from .step import train_step as optimizer_step

Say = Callable[[str], None]  # a log line


@dataclass(frozen=True)
class TrainResult:
    progress: Progress
    stopped_by: str | None = None  # the signal that stopped the run early (after a checkpoint)


def train(cfg: RunConfig, run_dir: Path, info: RankInfo) -> TrainResult:
    """The whole run of this rank (what ``train/entry.py`` runs)."""
    return Trainer(cfg, run_dir, info).fit()


class Trainer:
    """One rank's training run. Components, built in this order by ``__init__``: the tokenized
    data, ``train_objects`` (model chunks, optimizer, LR schedule), ``progress`` and
    ``resumed_from`` (what ``checkpoint.resume`` / ``init_from`` loaded), ``batches``,
    ``metrics`` (metrics.jsonl, TensorBoard, W&B), ``expert_load`` (MoE models),
    ``step_monitor`` (``monitor.enabled``), ``held_out`` (``train.eval_interval``) and
    ``checkpoints`` (the save policy).

    ``say``: where log lines go (default: printed by the logging rank)."""

    def __init__(self, cfg: RunConfig, run_dir: Path, info: RankInfo, say: Say | None = None):
        self.cfg, self.run_dir, self.info = cfg, run_dir, info
        self.device: torch.device = rank_device(info)
        self.say: Say = say if say is not None else logger_printer(info)
        self.data: PreparedData = _tokenized_data(cfg)
        self.train_objects: TrainObjects = build_train_objects(
            cfg, cfg.model.vocab_size or self.data.vocab_size, on_cpu=info.device == "cpu"
        )
        start = resume_training(cfg, run_dir, self.train_objects, self.say)
        self.progress: Progress = start.progress
        self.resumed_from: Path | None = start.checkpoint
        self.load_s: float = start.load_s
        self.batches: StepBatches = _training_batches(cfg, self.data, self.device)
        # Opened after the resume: a run that cannot resume leaves no metrics file behind.
        self.metrics = MetricsWriter(
            run_dir,
            cfg.log.tensorboard,
            enabled=info.is_logger,
            wandb=cfg if cfg.log.wandb else None,
        )
        if self.resumed_from is not None and self.progress.step < cfg.train.steps:
            self._record_resume_loss()
            self._record_resize()
        faults.install_routing(self._modules())  # test-only forced routers
        self.expert_load: ExpertLoad | None = _expert_load(cfg, self.train_objects, self.device)
        self.step_monitor: StepMonitor | None = (
            StepMonitor(cfg, self.expert_load, self.device, self.metrics, self.say)
            if cfg.monitor.enabled
            else None
        )
        self.held_out: HeldOutSet | None = self._held_out_set() if cfg.train.eval_interval else None
        self.checkpoints = CheckpointManager(
            cfg, run_dir, self.train_objects, self.metrics, self.say, resumed_from=self.resumed_from
        )

    # -- the public methods --------------------------------------------------------------------

    def train_step(self) -> dict:
        """One optimizer step on the global batch after ``progress``; advances ``progress``.
        Returns the step's metrics record, which is written and printed every log.interval
        steps and at the last one."""
        if self.step_monitor is not None:
            self.step_monitor.begin_step()
        result, loads, elapsed = self._timed_step()
        step = self.progress.step + 1
        if not math.isfinite(result.lm_loss):
            raise FloatingPointError(f"step {step}: loss is {result.lm_loss}; stopping the run")
        record = step_record(step, result, elapsed, loads)
        if self.step_monitor is not None:
            record.update(self.step_monitor.end_step(step, loads))
        if step % self.cfg.log.interval == 0 or step == self.cfg.train.steps:
            self.metrics.write(record)
            self.say(summary_line(record, self.cfg.train.steps))
        self.progress = Progress(
            step=step, consumed_samples=step * self.cfg.train.global_batch_size
        )
        return record

    def evaluate(self) -> float:
        """The held-out loss of the model as it is now (``train.eval_steps`` batches of the
        validation split), recorded as an "eval" event at the current step and printed."""
        if self.held_out is None:
            self.held_out = self._held_out_set()
        loss = self.held_out.loss(self.train_objects)
        self.metrics.write({"event": "eval", "step": self.progress.step, "valid_loss": loss})
        self.say(
            f"step {self.progress.step}: held-out loss {loss:.4f} "
            f"({self.held_out.num_batches} batches of the validation split)"
        )
        return loss

    def fit(self) -> TrainResult:
        """The run: steps up to ``train.steps`` with the evaluations and checkpoints the config
        asks for; on a stop signal, a checkpoint and an early return; closes the components."""
        self._announce()
        stop = StopRequest(self.device)
        stopped_by = None
        heartbeat.set_step(self.progress.step)
        try:
            if (
                self.held_out is not None
                and self.cfg.finetune is not None
                and self.progress.step == 0
            ):
                self.evaluate()  # the base model's held-out response loss
            # log.routing_trace: routing recorded during the steps, saved when they end.
            with training_trace(self.cfg, self.run_dir, self.info.rank, self._modules()):
                stopped_by = self._steps_until_done_or_stopped(stop)
        finally:
            stop.close()
            self.checkpoints.close()
            self.metrics.close()
        return TrainResult(self.progress, stopped_by)

    # -- the loop ------------------------------------------------------------------------------

    def _steps_until_done_or_stopped(self, stop: StopRequest) -> str | None:
        """The name of the signal that stopped the run, or None when it reached train.steps."""
        while self.progress.step < self.cfg.train.steps:
            self._step_with_heartbeat()
            if self.held_out is not None and self._eval_due():
                heartbeat.set_phase("eval")
                self.evaluate()
            self.checkpoints.poll()
            save_due = self.checkpoints.save_due(self.progress.step)
            # An elastic run's backend asks for a stop at the next checkpoint to grow back
            # (not after the last step: the run is over).
            grow_back = save_due and self.progress.step < self.cfg.train.steps
            stopped_by = stop.agreed(resize=grow_back and grow_back_requested(self.run_dir))
            if stopped_by is not None:
                self._stop_after_checkpoint(stopped_by)
                return stopped_by
            if save_due:
                self.checkpoints.save(self.progress)
        self.checkpoints.save_at_end(self.progress)
        return None

    def _step_with_heartbeat(self) -> None:
        """``train_step`` between the test-only faults, then the step's heartbeats."""
        if faults.before_step(self.progress.step + 1, self.info.rank):
            collectives.install()  # the armed hang fault fires inside a traced collective
        self.train_step()
        heartbeat.set_step(self.progress.step)  # read by this rank's heartbeat thread
        if self.info.is_logger:
            write_heartbeat(self.run_dir, self.progress.step)  # what moectl status shows
        faults.after_step(self.progress.step, self.info.rank)

    def _timed_step(self) -> tuple[StepResult, dict, float]:
        """(the step's result, its expert loads, its seconds): forward-backward and update."""
        started = time.perf_counter()
        faults.slow_step(torch.distributed.get_rank())
        heartbeat.set_phase("data")
        result = optimizer_step(
            self.train_objects,
            self._batch_iterators(self.progress.step),
            self.batches.num_microbatches,
            self.cfg.model.seq_length,
            self.cfg.train.micro_batch_size,
        )
        loads = self.expert_load.collect(self.batches.num_microbatches) if self.expert_load else {}
        return result, loads, time.perf_counter() - started

    def _eval_due(self) -> bool:
        step = self.progress.step
        return step % self.cfg.train.eval_interval == 0 or step == self.cfg.train.steps

    def _stop_after_checkpoint(self, signal_name: str) -> None:
        """Every rank agreed to stop after this step: make sure a checkpoint of it exists."""
        self.checkpoints.ensure_saved(self.progress)
        self.metrics.write({"event": "stopped", "step": self.progress.step, "signal": signal_name})
        self.say(
            f"stopped by {signal_name} after step {self.progress.step}, checkpoint saved; "
            "exiting so that the run can be requeued"
        )

    # -- set-up --------------------------------------------------------------------------------

    def _announce(self) -> None:
        cfg, vocab = self.cfg, self.train_objects.padded_vocab_size
        self.say(
            f"training {cfg.name}: steps {self.progress.step}..{cfg.train.steps}, "
            f"{self.info.world_size} ranks, vocab {vocab}, "
            f"layout {cfg.parallel.model_dump()}"
        )
        if self.info.is_logger:  # what the views need (moe_parallel/views: MFU, device, ranks)
            write_run_info(
                self.run_dir,
                run_info(cfg, vocab, self.info.device, self.info.world_size, self.progress.step),
            )
        self._record_pipeline()

    def _record_pipeline(self) -> None:
        """Event "pipeline": every rank's count of model chunks and the schedule it runs, so
        that a layout whose virtual pipeline was lost on the way to Megatron (one chunk, plain
        1F1B: the same losses) is seen. A collective: every rank sends its own."""
        mine = (len(self.train_objects.model), schedule_function().__name__)
        every = [None] * self.info.world_size
        torch.distributed.all_gather_object(every, mine)
        chunks, schedules = [c for c, _ in every], [s for _, s in every]
        self.metrics.write(
            {
                "event": "pipeline",
                "step": self.progress.step,
                "model_chunks": chunks,
                "schedule": schedules,
            }
        )
        self.say(f"model chunks per rank {chunks}; schedule {', '.join(sorted(set(schedules)))}")

    def _record_resume_loss(self) -> None:
        """The loss of the next batch under the loaded weights: equal to the next step's
        training loss of the run that saved the checkpoint, whatever layout loads it (a reshard
        check).

        Event "resume" when the run continues its own checkpoint; "init" when it starts from
        another run's weights (checkpoint.init_from), so that a run's resumes are exactly its
        restarts."""
        loss = evaluate_loss(
            self.train_objects,
            self._batch_iterators(self.progress.step),
            self.batches.num_microbatches,
            self.cfg.model.seq_length,
            self.cfg.train.micro_batch_size,
        )
        init_from = self.cfg.checkpoint.init_from
        initialised = init_from is not None and Path(self.resumed_from) == Path(init_from)
        self.metrics.write(
            {
                "event": "init" if initialised else "resume",
                "step": self.progress.step,
                "resume_loss": loss,
                "checkpoint": str(self.resumed_from),
                "load_s": self.load_s,
            }
        )
        self.say(f"loss of the next batch after resuming: {loss:.6f}")

    def _record_resize(self) -> None:
        """An elastic run that resumed at another data-parallel size than its checkpoint's
        records the change as an event: "elastic_shrink" or "elastic_grow", the step, the old
        and new layouts, and the cause the backend recorded in state.json."""
        if self.cfg.recovery.mode != "elastic":
            return
        saved = read_meta(self.resumed_from)["layout"]
        now = layout_of(self.cfg)
        if saved["data"] == now["data"]:
            return
        layout = RunLayout(self.run_dir)
        resizes = registry.read_record(self.run_dir).resizes if layout.state.is_file() else []
        event = {
            "event": GROW if now["data"] > saved["data"] else SHRINK,
            "step": self.progress.step,
            "from": saved,
            "to": now,
            "cause": resizes[-1].cause if resizes else "resumed at another data-parallel size",
            "time": time.time(),  # wall clock (benchmarks/elastic_recovery.py: restart cost)
        }
        self.metrics.write(event)
        self.say(
            f"{event['event']}: data-parallel {saved['data']} -> {now['data']} at step "
            f"{event['step']} ({event['cause']})"
        )

    def _held_out_set(self) -> HeldOutSet:
        t = self.cfg.train
        return HeldOutSet(self.cfg, self.data, t.eval_steps, t.seed, self.device)

    def _batch_iterators(self, step: int) -> list:
        return self.batches.iterators(step, len(self.train_objects.model))

    def _modules(self) -> list[torch.nn.Module]:
        """The model chunks without their data-parallel wrappers."""
        return [chunk.module for chunk in self.train_objects.model]


def rank_device(info: RankInfo) -> torch.device:
    """This rank's torch device: its GPU (set by the rank bootstrap) or the CPU."""
    if info.device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def logger_printer(info: RankInfo) -> Say:
    """Print a log line on the logging rank only."""

    def say(message: str) -> None:
        if info.is_logger:
            print(message, flush=True)

    return say


def _tokenized_data(cfg: RunConfig) -> PreparedData:
    """Pretraining: the prepared (tokenized) sources. Finetuning reads its own instruction data
    and needs only the tokenizer."""
    if cfg.finetune is None:
        return prepare(cfg.data)
    from moe_parallel.data.packing import tokenizer_only

    return tokenizer_only(cfg)


def _training_batches(cfg: RunConfig, data: PreparedData, device: torch.device) -> StepBatches:
    total = cfg.train.steps * cfg.train.global_batch_size
    if cfg.finetune is not None:  # packed prompt/response examples (data/packing.py)
        from moe_parallel.data.packing import finetune_datasets

        train_ds, _ = finetune_datasets(cfg, data.tokenizer_path, total, 0)
    else:
        # A collective: Megatron's builder lets rank 0 build the sample index, then the others
        # read it.
        train_ds, _, _ = build_gpt_datasets(
            data,
            cfg.data.split,
            cfg.model.seq_length,
            cfg.train.seed,
            (total, 0, 0),
            str(cache_root(cfg.data) / "index-cache"),
            data_parallel_size=cfg.parallel.data,
        )
    return StepBatches(
        train_ds,
        cfg.train.global_batch_size,
        cfg.train.micro_batch_size,
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(),
        device,
    )


def _expert_load(cfg: RunConfig, objs: TrainObjects, device: torch.device) -> ExpertLoad | None:
    if cfg.model.moe is None:
        return None
    m = cfg.model
    return ExpertLoad(
        [chunk.module for chunk in objs.model],
        m.num_layers + m.mtp_layers,
        m.moe.num_experts,
        device,
        mtp_layers=m.mtp_layers,
        expert_bias=m.moe.expert_bias,
    )
