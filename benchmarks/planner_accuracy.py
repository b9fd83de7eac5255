"""The planner's predicted step time against the measured median step, on CPU ranks.

    python benchmarks/planner_accuracy.py [--hardware PROFILE.yaml] [--repeats N] [--save-profile P]

Calibrates this machine (`moectl plan calibrate`) unless --hardware is given, then for the tiny
config and the hidden-256 and hidden-512 configs on 1 and 2 ranks (EP1; EP2; TP2+SP; PP2 with 4
micro-batches) prints predicted and measured step time and the relative error; the headline last
as ``planner_step_error=<median absolute relative error>`` (goal: <= 0.15).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_parallel.bench.calibrate import measure_profile  # noqa: E402
from moe_parallel.bench.planner_accuracy import (  # noqa: E402
    CONFIGS,
    LAYOUTS,
    median_error,
    run_case,
)
from moe_parallel.plan.hardware import load_profile  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hardware", help="a CPU profile (default: calibrate now)")
    parser.add_argument("--repeats", type=int, default=6, help="timed steps per case")
    parser.add_argument("--save-profile", help="write the calibrated profile here")
    args = parser.parse_args()
    hw = load_profile(args.hardware) if args.hardware else measure_profile(2, "calibrated CPU")
    if args.save_profile:
        Path(args.save_profile).write_text(hw.as_yaml())
    print(f"profile: {hw.name}; {hw.sources[0] if hw.sources else ''}")
    print(f"{'config':36} {'layout':30} {'predicted s':>11} {'measured s':>10} {'error':>6}")
    cases = []
    for config in CONFIGS:
        for layout in LAYOUTS:
            case = run_case(config, layout, hw, args.repeats)
            cases.append(case)
            print(
                f"{config:36} {layout:30} {case.predicted_s:11.3f} {case.measured_s:10.3f} "
                f"{case.error:6.1%}",
                flush=True,
            )
    print(f"cases={len(cases)} worst_error={max(c.error for c in cases):.3f}")
    print(f"planner_step_error={median_error(cases):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
