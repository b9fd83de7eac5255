"""Async vs synchronous checkpoint save (blocking time), save and load MB/s.

    python benchmarks/checkpoint_save.py [CONFIG] [key=value ...]

Without arguments: the tiny config (11.8 MB), then the same model at hidden size 384 (about
280 MB) and 768 (about 1.07 GB), where the writes dominate. The headline of each run last:
``async_blocking_ratio=<x>`` (goal: <= 0.05). What blocks is mostly fixed per save (the fork, the
plan), so the ratio falls as the state grows.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_parallel.bench.common import run_benchmark  # noqa: E402

SIZES = [
    [],
    ["model.hidden_size=384", "model.ffn_hidden_size=768", "model.moe.expert_ffn_hidden_size=768"],
    [
        "model.hidden_size=768",
        "model.ffn_hidden_size=1536",
        "model.moe.expert_ffn_hidden_size=1536",
    ],
]

if __name__ == "__main__":
    args = sys.argv[1:]
    config = args.pop(0) if args and "=" not in args[0] else "configs/tiny/moe_tiny.yaml"
    runs = [args] if sys.argv[1:] else SIZES
    for overrides in runs:
        print(f"== {config} {' '.join(overrides)}", flush=True)
        rc = run_benchmark(config, overrides, [5], module="moe_parallel.bench.checkpoint_save")
        if rc:
            sys.exit(rc)
