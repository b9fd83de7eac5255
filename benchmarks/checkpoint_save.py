"""Async vs synchronous checkpoint save (blocking time), save and load MB/s.

    python benchmarks/checkpoint_save.py [CONFIG] [key=value ...]

The headline last: ``async_blocking_ratio=<x>`` (goal: <= 0.05).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_parallel.bench import run_benchmark  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    config = args.pop(0) if args and "=" not in args[0] else "configs/tiny/moe_tiny.yaml"
    sys.exit(run_benchmark(config, args, repeats=3, module="moe_parallel.bench_ckpt"))
