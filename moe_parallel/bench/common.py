"""What the training benchmarks share: launching a benchmark module on local ranks, and on each
rank the one set-up (the rank bootstrap, then a Trainer of the run's config) that the module's
measurement drives through the Trainer's public methods.

A benchmark module runs as ``python -m MODULE RUN_DIR ARG...`` on every rank and calls
:func:`run_rank` with its measurement, which reads its own arguments.

Benchmarks that compare two kinds of step (A and B, e.g. bare Megatron and moectl) time them in
interleaved pairs (:func:`interleaved_pairs`) and report the median of the per-pair B/A ratios
with a bootstrap interval (:func:`median_ratio_interval`), running until the interval is narrow
enough to judge their goal or a time cap passes (:class:`StopRule`).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from moe_parallel.train.trainer import Trainer

Measure = Callable[["Trainer", Path, list[str]], None]  # (trainer, run directory, its arguments)


def run_benchmark(
    config: str,
    overrides: list[str],
    rank_args: Sequence[str],
    module: str = "moe_parallel.bench.step_overhead",
) -> int:
    """Launcher side: validate, then run ``module RUN_DIR *rank_args`` on local ranks; returns
    their exit code."""
    from cluster import RunSpec, run_local
    from moe_parallel.launch_run import plan_train

    launch = plan_train(
        config,
        [*overrides, "checkpoint.save_at_end=false", "log.tensorboard=false"],
        None,
        None,
        nproc=None,
    )
    spec = RunSpec(
        run_dir=launch.run_dir,
        world_size=launch.cfg.world_size,
        entry=[sys.executable, "-m", module, str(launch.run_dir), *map(str, rank_args)],
    )
    return run_local(spec, stream=True)


def run_rank(measure: Measure, overrides: Sequence[str] = ()) -> None:
    """Rank side, from ``sys.argv`` (RUN_DIR ARG...): set up, measure, leave the groups."""
    from moe_parallel.runtime.bootstrap import stop_rank

    run_dir = Path(sys.argv[1])
    measure(start_trainer(run_dir, overrides), run_dir, sys.argv[2:])
    stop_rank()


def start_trainer(run_dir: Path, overrides: Sequence[str] = (), device: str = "cpu") -> Trainer:
    """Bootstrap this rank on ``device`` and build a Trainer of RUN_DIR/config.yaml (with
    ``overrides``) from fresh weights (unless the overrides set ``checkpoint.resume``), silent,
    writing its metrics to a scratch directory: a benchmark repeats step numbers, which the run's
    own metrics.jsonl must not show."""
    from moe_parallel.runtime.bootstrap import prepare_process, start_rank

    prepare_process(device)  # the warning filters before anything imports Megatron
    from moe_parallel.config import load_config

    cfg = load_config(run_dir / "config.yaml", ["checkpoint.resume=none", *overrides])
    info = start_rank(cfg, device)
    from moe_parallel.train.trainer import Trainer  # Megatron: after the bootstrap

    return Trainer(cfg, Path(tempfile.mkdtemp()), info, say=lambda message: None)


def step_at(trainer: Trainer, step: int) -> dict:
    """``trainer.train_step()`` on the batch after ``step`` (modulo ``train.steps``: the run's
    data covers that many steps, a benchmark may run more). Returns the step's record."""
    from moe_parallel.ckpt.checkpoint import Progress

    trainer.progress = Progress(step % trainer.cfg.train.steps, 0)
    return trainer.train_step()


@dataclass(frozen=True)
class RatioInterval:
    """The median of paired B/A ratios and its bootstrap interval."""

    median: float
    low: float
    high: float
    pairs: int
    confidence: float = 0.95

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def describe(self) -> str:
        return (
            f"{self.median:.4f} ({100 * self.confidence:.0f}% interval {self.low:.4f} to "
            f"{self.high:.4f}, half-width {self.half_width:.4f}, {self.pairs} pairs)"
        )


def median_ratio_interval(
    ratios: Sequence[float], confidence: float = 0.95, resamples: int = 4000, seed: int = 0
) -> RatioInterval:
    """Median of ``ratios`` with a percentile bootstrap interval: the ratios resampled with
    replacement ``resamples`` times, the interval the central ``confidence`` share of the
    resamples' medians (Efron and Tibshirani, An Introduction to the Bootstrap, 1993, ch. 13).
    Deterministic for a given ``seed``."""
    if len(ratios) == 0:
        raise ValueError("median_ratio_interval: no ratios (at least one pair is needed)")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: must be between 0 and 1")
    values = np.asarray(ratios, dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    medians = np.median(values[draws], axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(medians, [tail, 1 - tail])
    return RatioInterval(float(np.median(values)), float(low), float(high), len(values), confidence)


@dataclass(frozen=True)
class StopRule:
    """When a paired benchmark has measured enough: after ``min_pairs`` pairs (warm-up pairs not
    counted), once the interval's half-width is below ``margin`` (the goal's distance from 1,
    e.g. 0.02 for a goal of <= 1.02), or once ``max_seconds`` have passed."""

    margin: float
    max_seconds: float
    min_pairs: int = 10
    warmup_pairs: int = 2
    check_every: int = 5  # pairs between two looks at the interval

    def reason_to_stop(self, ratios: Sequence[float], elapsed_s: float) -> str | None:
        """'interval' or 'time cap' when measuring should stop, else None."""
        if elapsed_s >= self.max_seconds:
            return "time cap"
        if len(ratios) >= self.min_pairs and median_ratio_interval(ratios).half_width < self.margin:
            return "interval"
        return None


@dataclass(frozen=True)
class PairedTimes:
    """Seconds of each kind of step, pair by pair (warm-up pairs dropped), and why it stopped."""

    a: list[float]
    b: list[float]
    stopped_by: str

    @property
    def ratios(self) -> list[float]:
        return [b / a for a, b in zip(self.a, self.b)]


def interleaved_pairs(
    run: Callable[[str, int], None],
    kinds: tuple[str, str],
    rule: StopRule,
    before: Callable[[str], None] = lambda kind: None,
) -> PairedTimes:
    """Time ``run(kind, step)`` for the two ``kinds`` in pairs, in alternating order (AB, BA,
    AB, ...: drift and warm-up hit both alike), each step between two barriers, until ``rule``
    stops it. ``before(kind)`` is called untimed before each step. A collective: every rank calls
    it; rank 0's times decide when to stop, for all."""
    import torch

    times: dict[str, list[float]] = {kinds[0]: [], kinds[1]: []}
    started, step = time.perf_counter(), 0
    while True:
        for kind in kinds if len(times[kinds[0]]) % 2 == 0 else kinds[::-1]:
            before(kind)
            torch.distributed.barrier()
            t = time.perf_counter()
            run(kind, step)
            torch.distributed.barrier()
            times[kind].append(time.perf_counter() - t)
            step += 1
        a, b = (times[k][rule.warmup_pairs :] for k in kinds)
        if len(a) == 0 or len(a) % rule.check_every:
            continue
        reason = None
        if torch.distributed.get_rank() == 0:
            ratios = [y / x for x, y in zip(a, b)]
            reason = rule.reason_to_stop(ratios, time.perf_counter() - started)
        decision = torch.tensor([0 if reason is None else 1 if reason == "interval" else 2])
        torch.distributed.broadcast(decision, src=0)
        if int(decision):
            return PairedTimes(a, b, "interval" if int(decision) == 1 else "time cap")


def report_interval(name: str, times: PairedTimes) -> None:
    """Print the median pair ratio with its interval, then ``name=<median>`` as the last line."""
    interval = median_ratio_interval(times.ratios)
    print(f"{name}_interval_low={interval.low:.4f} {name}_interval_high={interval.high:.4f}")
    print(f"{name} {interval.describe()}, stopped by the {times.stopped_by}")
    print(f"{name}={interval.median:.4f}", flush=True)
