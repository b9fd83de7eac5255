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


def run_case(config: str, layout: str, hw: HardwareProfile, repeats: int) -> Case:
    return run_cases([(config, layout)], hw, repeats, rounds=1)[0]


def run_cases(
    cases: list[tuple[str, str]], hw: HardwareProfile, repeats: int, rounds: int, say=None
) -> list[Case]:
    """Each (config, layout) of ``cases`` predicted and measured: ``repeats`` steps per round,
    the cases taking turns over ``rounds`` rounds, so that a burst of other load on a shared
    machine falls on several cases a little rather than on one case whole."""
    from moe_parallel.bench.calibrate import predicted
    from moe_parallel.bench.step_time import measure_step_times

    times: dict[tuple[str, str], list[float]] = {case: [] for case in cases}
    for round_ in range(rounds):
        for config, layout in cases:
            times[config, layout] += measure_step_times(config, LAYOUTS[layout], repeats)
            if say:
                say(f"round {round_ + 1}/{rounds}: {config} {layout}")
    return [
        Case(
            config,
            layout,
            predicted(config, LAYOUTS[layout], hw),
            statistics.median(times[config, layout]),
            min(times[config, layout]),
        )
        for config, layout in cases
    ]


def median_error(cases: list[Case]) -> float:
    return statistics.median(c.error for c in cases)
