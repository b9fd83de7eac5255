"""Step time, tokens/s and moectl's overhead over a bare Megatron-core loop (same run).

    python benchmarks/overhead.py [CONFIG] [key=value ...] [--max-seconds S] [--min-pairs N]

Bare and moectl steps alternate in pairs; the median of the per-pair moectl/bare ratios is
reported with its bootstrap 95% interval, measuring until the interval's half-width is below 0.02
or the time cap (moe_parallel/bench/step_overhead.py). Prints figures; the headline last as
``overhead_ratio=<x>`` (goal: <= 1.02).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.cli import main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or "=" in args[0] or args[0].startswith("--"):
        args = ["configs/tiny/moe_tiny.yaml", *args]
    sys.exit(main(["bench", *args]))
