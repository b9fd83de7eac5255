"""The planner's predicted step time against the measured median step on CPU ranks.

For each config and layout of CASES, the per-op model (plan/estimate.py) on a hardware profile
calibrated on this machine (bench/calibrate.py) predicts the step; bench/step_time.py measures it
(one thread per rank). The error of a case is |predicted - measured| / measured.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from moe_parallel.plan.hardware import HardwareProfile

CONFIGS = (
    "configs/tiny/moe_tiny.yaml",
    "configs/bench/moe_h256.yaml",
    "configs/bench/moe_h512.yaml",
)
LAYOUTS = {
    "1 rank EP1": ["parallel.expert=1", "parallel.data=1"],
    "2 ranks EP2": ["parallel.expert=2", "parallel.data=2"],
    "2 ranks TP2+SP": [
        "parallel.expert=1",
        "parallel.data=1",
        "parallel.tensor=2",
        "parallel.sequence_parallel=true",
    ],
    "2 ranks PP2, 4 micro-batches": ["parallel.expert=1", "parallel.data=1", "parallel.pipeline=2"],
}


@dataclass
class Case:
    config: str
    layout: str
    predicted_s: float
    measured_s: float  # median step
    fastest_s: float  # fastest step: the least disturbed by other load on a shared machine

    @property
    def error(self) -> float:
        return abs(self.predicted_s - self.measured_s) / self.measured_s

    @property
    def error_vs_fastest(self) -> float:
        return abs(self.predicted_s - self.fastest_s) / self.fastest_s


def predicted_step(config: str, overrides: list[str], hw: HardwareProfile) -> float:
    from moe_parallel.config import load_config
    from moe_parallel.data import prepare
    from moe_parallel.plan.estimate import estimate_step_time
    from moe_parallel.plan.layouts import padded_vocab
    from moe_parallel.plan.memory import Layout

    cfg = load_config(config, overrides)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = prepare(cfg.data).vocab_size
    layout = Layout.of(cfg)
    return estimate_step_time(cfg, layout, padded_vocab(cfg, layout), hw).total_s


def run_case(config: str, layout: str, hw: HardwareProfile, repeats: int) -> Case:
    from moe_parallel.bench.step_time import measure_step_times

    overrides = LAYOUTS[layout]
    times = measure_step_times(config, overrides, repeats)
    predicted = predicted_step(config, overrides, hw)
    return Case(config, layout, predicted, statistics.median(times), min(times))


def median_error(cases: list[Case]) -> float:
    return statistics.median(c.error for c in cases)
