"""The planner's predicted step time against the measured median step, on CPU ranks.

    python benchmarks/planner_accuracy.py [--hardware PROFILE.yaml] [--repeats N] [--rounds R]
        [--save-profile P]

Calibrates this machine (`moectl plan calibrate`) unless --hardware is given, then for the tiny
config and the hidden-256 and hidden-512 configs on 1 and 2 ranks (EP1; EP2; TP2+SP; PP2 with 4
micro-batches) prints the predicted step time, the measured median step (the cases take turns
over --rounds rounds of --repeats steps each) and its relative error,
and the fastest step and its error (the least disturbed by other load on a shared machine); the
headline last as ``planner_step_error=<median over cases of |predicted - median| / median>``
(goal: <= 0.15).
"""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_parallel.bench.calibrate import measure_profile  # noqa: E402
from moe_parallel.bench.planner_accuracy import (  # noqa: E402
    CONFIGS,
    LAYOUTS,
    median_error,
    run_cases,
)
from moe_parallel.plan.hardware import load_profile  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hardware", help="a CPU profile (default: calibrate now)")
    parser.add_argument("--repeats", type=int, default=4, help="timed steps per case and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all the cases")
    parser.add_argument("--save-profile", help="write the calibrated profile here")
    args = parser.parse_args()
    hw = load_profile(args.hardware) if args.hardware else measure_profile(2, "calibrated CPU")
    if args.save_profile:
        Path(args.save_profile).write_text(hw.as_yaml())
    print(f"profile: {hw.name}; {hw.sources[0] if hw.sources else ''}")
    pairs = [(config, layout) for config in CONFIGS for layout in LAYOUTS]
    cases = run_cases(pairs, hw, args.repeats, args.rounds, say=lambda m: print(m, flush=True))
    print(
        f"{'config':30} {'layout':30} {'predicted s':>11} {'median s':>9} {'error':>6} "
        f"{'fastest s':>9} {'error':>6}"
    )
    for case in cases:
        print(
            f"{Path(case.config).name:30} {case.layout:30} {case.predicted_s:11.3f} "
            f"{case.measured_s:9.3f} {case.error:6.1%} {case.fastest_s:9.3f} "
            f"{case.error_vs_fastest:6.1%}",
            flush=True,
        )
    print(f"cases={len(cases)} worst_error={max(c.error for c in cases):.3f}")
    vs_fastest = statistics.median(c.error_vs_fastest for c in cases)
    print(f"planner_step_error_vs_fastest_step={vs_fastest:.3f}")
    print(f"planner_step_error={median_error(cases):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
