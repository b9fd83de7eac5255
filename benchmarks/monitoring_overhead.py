"""Step time with monitoring on and off (monitor.enabled), interleaved in one run on local ranks.

    python benchmarks/monitoring_overhead.py [CONFIG] [key=value ...] [--max-seconds S]
        [--min-pairs N]

"On" adds collective tracing, the per-rank compute/communication all_gather with the straggler
decision, router entropy and dead-expert tracking (moe_parallel/bench/monitor_overhead.py); on and
off steps alternate in pairs, the median of the per-pair on/off ratios is reported with its
bootstrap 95% interval, measuring until the interval's half-width is below 0.01 or the time cap.
Prints figures; the headline last as ``monitoring_overhead_ratio=<x>`` (goal: <= 1.01).
"""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moe_parallel.bench.common import run_benchmark  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(REPO / "configs/tiny/moe_tiny.yaml"))
    parser.add_argument("overrides", nargs="*", help="dotted key=value")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="time cap (600)")
    parser.add_argument("--min-pairs", type=int, default=10, help="pairs measured at least")
    args = parser.parse_args(argv)
    if "=" in args.config:  # only overrides were given
        args.overrides.insert(0, args.config)
        args.config = str(REPO / "configs/tiny/moe_tiny.yaml")
    return run_benchmark(
        args.config,
        args.overrides,
        [args.max_seconds, args.min_pairs],
        module="moe_parallel.bench.monitor_overhead",
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
