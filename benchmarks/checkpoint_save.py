"""Async vs synchronous checkpoint save (blocking time), save and load MB/s.

    python benchmarks/checkpoint_save.py [--record] [CONFIG] [key=value ...]

Without arguments: the tiny config (11.8 MB), then the same model at hidden size 384 (about
280 MB) and 768 (about 1.07 GB), where the writes dominate. The headline of each run last:
``async_blocking_ratio=<x>`` (goal: <= 0.05). What blocks is mostly fixed per save (the fork, the
plan), so the ratio falls as the state grows.

--record writes the figures of the last (largest) state measured to
benchmarks/results/recovery_costs.json: its ``async_blocking_ratio`` is the goodput simulator's
blocking share of an async save.
"""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measured_costs import record_figures  # noqa: E402
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


def main(args: list[str]) -> int:
    record = "--record" in args
    args = [a for a in args if a != "--record"]
    config = args.pop(0) if args and "=" not in args[0] else "configs/tiny/moe_tiny.yaml"
    runs = [args] if args or config != "configs/tiny/moe_tiny.yaml" else SIZES
    with tempfile.TemporaryDirectory() as scratch:
        figures = Path(scratch) / "figures.json"
        for overrides in runs:
            print(f"== {config} {' '.join(overrides)}", flush=True)
            rank_args = [5, figures]
            rc = run_benchmark(
                config, overrides, rank_args, module="moe_parallel.bench.checkpoint_save"
            )
            if rc:
                return rc
        if record:  # the goodput simulator's async blocking share (benchmarks/results/)
            measured = json.loads(figures.read_text())
            state = f"{config} {' '.join(overrides)}".strip()
            path = record_figures(
                "checkpoint_save", measured, note=f"the last state measured: {state}"
            )
            print(f"recorded in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
