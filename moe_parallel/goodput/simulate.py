"""The failure simulator: many runs of a job on a cluster, each a sequence of failures, and where
its wall-clock time goes (useful work, saves, detection, restarts, recomputation, ...).

A run lasts ``days``. Failures of each component arrive as a Poisson process (rate per GPU-hour x
GPUs), drawn with a seeded generator, so a seed fixes the result. Between two failures the job:

1. recovers from the previous failure, in stages: detection (a heartbeat for a crash, the hang
   watchdog's timeout for a hang), waiting for a replacement node (none while one of
   ``spare_nodes`` is free; ``restart`` waits for it; ``elastic`` waits at most
   ``wait_for_capacity_s`` and then goes on with fewer data-parallel replicas), process
   start-up, process-group initialisation and the checkpoint load; a planned stop instead saves
   synchronously first and loses nothing. A failure during recovery starts the recovery over.
2. (elastic, after a shrink) runs at a reduced throughput until the replacement arrives, stops at
   its next checkpoint and grows back (process start-up, process-group init and load again);
3. runs in segments of ``interval_s`` of training followed by the save's blocking time: a
   checkpoint is durable once its save ends. A failure loses the training since the last one.

The runs are independent renewal sequences, so the simulation is vectorised: every gap between
failures of every run is evaluated at once from its length (numpy), thousands of runs a second.
The spare pool is the one piece of history (a spare taken by one loss is back only after the
replacement delay): :func:`replacement_waits` walks it failure by failure, all runs at once.
With one exponential component and fixed costs this is Daly's model ("A higher order estimate of
the optimum checkpoint interval for restart dumps", FGCS 2006), whose closed form
:func:`daly_ettr` the tests compare against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .failures import FailureModel

HOUR = 3600.0
# The causes time is lost to, in the order of the report.
RECOVERY_STAGES = ("detection", "waiting", "process_start", "process_group_init", "load")
CAUSES = (
    *RECOVERY_STAGES,
    "final_save",
    "recompute",
    "save_blocking",
    "reduced_capacity",
    "grow_back",
)


@dataclass(frozen=True)
class RecoveryCosts:
    """What one failure and one save cost, in seconds (costs.py derives them for a config)."""

    detect_crash_s: float
    detect_hang_s: float
    replacement_delay_s: float  # a node that left: until a replacement joins
    process_start_s: float
    process_group_init_s: float
    load_s: float
    save_blocking_s: float  # training waits this long per save
    save_write_s: float  # a whole save (the planned stop's synchronous save; the shortest interval)
    mode: str = "restart"  # or "elastic"
    spare_nodes: int = 0  # idle nodes that replace a lost one at once (refilled after the delay)
    wait_for_capacity_s: float = 0.0  # elastic: wait this long for a replacement, then shrink
    shrunk_fraction: float = 1.0  # elastic: throughput after losing one node
    grow_back: bool = True
    sources: dict = field(default_factory=dict, compare=False)  # where each figure comes from

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class Outcome:
    """The mean over the runs: ETTR and the hours of a run by cause."""

    ettr: float
    ettr_p05: float
    ettr_p95: float
    hours: float  # wall-clock hours of one run
    useful_hours: float
    lost_hours: dict[str, float]
    failures_per_run: float
    interval_s: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class FailureDraws:
    """The failures of every run: times (s, sorted, ``inf`` past the end) and component index."""

    times: np.ndarray  # (runs, slots)
    kinds: np.ndarray  # (runs, slots)
    horizon_s: float
    rate_per_s: float  # all components together, for the whole cluster

    @property
    def mtbf_s(self) -> float:
        return 1.0 / self.rate_per_s


def draw_failures(
    model: FailureModel, gpus: int, days: float, runs: int, seed: int
) -> FailureDraws:
    """Every run's failures over ``days`` (the same seed gives the same draws)."""
    rates = np.array([c.rate_per_gpu_hour for c in model.components]) * gpus / HOUR
    total = rates.sum()
    horizon = days * 24 * HOUR
    rng = np.random.default_rng(seed)
    expected = total * horizon
    slots = int(expected + 8 * math.sqrt(expected) + 16)  # P(more failures) is negligible
    times = np.cumsum(rng.exponential(1.0 / total, size=(runs, slots)), axis=1)
    if (times[:, -1] < horizon).any():
        raise RuntimeError("failure draw ran out of slots; this is a bug")  # ~8 sigma
    kinds = rng.choice(len(rates), size=(runs, slots), p=rates / total)
    times[times >= horizon] = np.inf
    return FailureDraws(times, kinds, horizon, float(total))


def _stage_lengths(model: FailureModel, costs: RecoveryCosts) -> np.ndarray:
    """Per component: recovery stage lengths (k, 6: ``final_save`` then the stages), the wait
    for a replacement left at 0 (:func:`replacement_waits` gives it per failure)."""
    rows = []
    for c in model.components:
        detect = 0.0 if c.planned else (costs.detect_hang_s if c.hang else costs.detect_crash_s)
        final = costs.save_write_s if c.planned else 0.0
        restart = (costs.process_start_s, costs.process_group_init_s, costs.load_s)
        rows.append((final, detect, 0.0, *restart))  # a planned stop saves first
    return np.array(rows)


def replacement_waits(model: FailureModel, costs: RecoveryCosts, draws: FailureDraws) -> np.ndarray:
    """Per failure (runs, slots): seconds from the failure until a node takes the lost one's
    place; 0 for failures that keep their nodes.

    Without spares every lost node waits ``replacement_delay_s``. With ``spare_nodes`` the
    cluster holds that many idle nodes: a lost node is replaced at once by a free one and goes
    to repair, coming back as a spare ``replacement_delay_s`` later; with none free the run
    waits for the first node back from repair. So a wait depends on the run's earlier losses:
    the pool is walked failure by failure, every run at once (one numpy step per failure slot,
    each run's slot ``s`` holds the time its ``s``-th spare is ready)."""
    replaces = np.array([c.replace for c in model.components])[draws.kinds]
    replaces &= np.isfinite(draws.times)
    delay = costs.replacement_delay_s
    if costs.spare_nodes == 0:
        return np.where(replaces, delay, 0.0)
    runs, slots = draws.times.shape
    ready_at = np.zeros((runs, min(costs.spare_nodes, slots)))  # more can never be used
    waits = np.zeros((runs, slots))
    rows = np.arange(runs)
    for j in np.flatnonzero(replaces.any(axis=0)):
        lost, t = replaces[:, j], draws.times[:, j]
        first = ready_at.argmin(axis=1)  # the spare ready soonest
        ready = ready_at[rows, first]
        # The node back from repair at t + delay refills the spare that was taken.
        waits[:, j] = np.where(lost, np.clip(ready - t, 0.0, delay), 0.0)
        ready_at[rows, first] = np.where(lost, t + delay, ready)
    return waits


def _run_phase(x: np.ndarray, interval: float, blocking: float):
    """Training for ``x`` seconds from a checkpoint: (durable training, save time, training
    since the last checkpoint)."""
    segment = interval + blocking
    done = np.floor(x / segment)
    rest = x - done * segment
    return (
        done * interval,
        done * blocking + np.maximum(rest - interval, 0),
        np.minimum(rest, interval),
    )


def _gaps(model: FailureModel, draws: FailureDraws):
    """Each gap between failures: (length, the failure that opened it (-1: the run's start),
    whether it ends with a failure that loses work)."""
    runs = draws.times.shape[0]
    start = np.concatenate([np.zeros((runs, 1)), draws.times[:, :-1]], axis=1)
    end = np.minimum(draws.times, draws.horizon_s)
    gap = np.where(start < draws.horizon_s, end - start, 0.0)
    previous = np.concatenate([np.full((runs, 1), -1), draws.kinds[:, :-1]], axis=1)
    planned = np.array([c.planned for c in model.components])
    return gap, previous, np.isfinite(draws.times) & ~planned[draws.kinds]


def _spend_recovery(gap, stages, lost: dict) -> np.ndarray:
    """Charge each recovery stage's time (cut short by the next failure); the time left."""
    elapsed = np.zeros_like(gap)
    for i, name in enumerate(("final_save", *RECOVERY_STAGES)):
        lost[name] += np.clip(gap - elapsed, 0, stages[..., i]).sum()
        elapsed += stages[..., i]
    return np.maximum(gap - elapsed, 0)


def _split_running(running, shrink, costs: RecoveryCosts, interval_s: float, lost: dict):
    """Elastic: (time shrunk, time at full size) of the running time. Shrunk until the
    replacement arrives and on to the next checkpoint, then a grow-back restart."""
    segment = interval_s + costs.save_blocking_s
    if costs.grow_back:
        shrunk_len = np.ceil(shrink / segment) * segment
    else:
        shrunk_len = np.where(shrink > 0, np.inf, 0.0)
    regrow = costs.process_start_s + costs.process_group_init_s + costs.load_s
    grow = np.where(shrink > 0, regrow, 0.0)
    lost["grow_back"] += np.clip(running - shrunk_len, 0, grow).sum()
    return np.minimum(running, shrunk_len), np.maximum(running - shrunk_len - grow, 0)


def _waiting_and_shrink(
    model: FailureModel, costs: RecoveryCosts, draws: FailureDraws
) -> tuple[np.ndarray, np.ndarray]:
    """Per gap: the recovery's wait for a replacement, and (elastic) the time after it that the
    run spends shrunk until the replacement arrives (0 when it does not shrink)."""
    waits = replacement_waits(model, costs, draws)
    waits = np.concatenate([np.zeros((waits.shape[0], 1)), waits[:, :-1]], axis=1)  # by gap
    if costs.mode != "elastic":
        return waits, np.zeros_like(waits)
    longer = waits > costs.wait_for_capacity_s
    shrink = np.where(longer, waits - costs.wait_for_capacity_s, 0.0)
    return np.where(longer, costs.wait_for_capacity_s, waits), shrink


def simulate(
    model: FailureModel, costs: RecoveryCosts, draws: FailureDraws, interval_s: float
) -> Outcome:
    """The runs of ``draws`` with a checkpoint every ``interval_s`` seconds of training."""
    gap, previous, by_failure = _gaps(model, draws)
    opened = np.maximum(previous, 0)
    first = (previous < 0)[..., None]  # the run's start: no recovery
    stages = np.where(first, 0.0, _stage_lengths(model, costs)[opened])
    stages[..., 2], shrink = _waiting_and_shrink(model, costs, draws)
    lost = dict.fromkeys(CAUSES, 0.0)
    running = _spend_recovery(gap, stages, lost)
    shrunk, full = _split_running(running, shrink, costs, interval_s, lost)

    useful = np.zeros(gap.shape[0])
    for x, fraction in ((shrunk, costs.shrunk_fraction), (full, 1.0)):
        durable, saves, pending = _run_phase(x, interval_s, costs.save_blocking_s)
        wasted = pending * by_failure  # training since the last checkpoint
        kept = (durable + pending - wasted).sum(axis=1)
        lost["save_blocking"] += saves.sum()
        lost["recompute"] += wasted.sum()
        lost["reduced_capacity"] += (1 - fraction) * kept.sum()
        useful += fraction * kept
    return _outcome(useful, lost, draws, interval_s)


def _outcome(useful: np.ndarray, lost: dict, draws: FailureDraws, interval_s: float) -> Outcome:
    runs, ettr = len(useful), useful / draws.horizon_s
    return Outcome(
        ettr=float(ettr.mean()),
        ettr_p05=float(np.percentile(ettr, 5)),
        ettr_p95=float(np.percentile(ettr, 95)),
        hours=draws.horizon_s / HOUR,
        useful_hours=float(useful.mean()) / HOUR,
        lost_hours={k: float(v) / runs / HOUR for k, v in lost.items()},
        failures_per_run=float(np.isfinite(draws.times).sum() / runs),
        interval_s=interval_s,
    )


def daly_ettr(rate_per_s: float, recovery_s: float, blocking_s: float, interval_s: float) -> float:
    """Closed form of the simulated model with one exponential component and fixed costs (Daly
    2006): a segment of ``interval_s`` training plus one save takes on average
    e^(lambda R) (e^(lambda (tau + delta)) - 1) / lambda seconds."""
    lam = rate_per_s
    return (
        lam * interval_s * math.exp(-lam * recovery_s) / math.expm1(lam * (interval_s + blocking_s))
    )


def young_daly_interval(blocking_s: float, mtbf_s: float) -> float:
    """Young (1974) / Daly (2006) first order: sqrt(2 x save cost x MTBF)."""
    return math.sqrt(2 * blocking_s * mtbf_s)


def best_interval(
    model: FailureModel,
    costs: RecoveryCosts,
    draws: FailureDraws,
    shortest_s: float,
    points: int = 33,
) -> tuple[float, list[Outcome]]:
    """The interval with the highest simulated ETTR, and the curve it was read from.

    The runs share their failures (common random numbers), so the curve is smooth; ETTR near its
    peak is close to a + b cosh(log(tau / tau*)) (the first-order model is symmetric in log tau),
    so the peak is the vertex of a parabola in log tau fitted to the points around the best one,
    which is steadier than the best grid point of a flat curve."""
    guess = young_daly_interval(max(costs.save_blocking_s, 1e-3), draws.mtbf_s)
    lo = max(shortest_s, guess / 30)
    hi = max(guess * 30, lo * 10)
    grid = np.geomspace(lo, hi, points)
    curve = [simulate(model, costs, draws, float(t)) for t in grid]
    ettr = np.array([o.ettr for o in curve])
    top = int(ettr.argmax())
    near = slice(max(top - 3, 0), min(top + 4, points))
    x, y = np.log(grid[near]), ettr[near]
    if top in (0, points - 1) or len(x) < 5:
        return float(grid[top]), curve  # the peak is at an end: the shortest allowed interval
    a, b, _ = np.polyfit(x, y, 2)
    vertex = -b / (2 * a) if a < 0 else x[np.argmax(y)]
    return float(np.exp(np.clip(vertex, x[0], x[-1]))), curve
