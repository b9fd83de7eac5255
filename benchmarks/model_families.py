"""Tiny twins of the model families on CPU ranks: step time and tokens/s with EP1 vs EP2, and
the cost of the families' routers relative to Megatron's plain top-k router (same twin, same
data, same machine, one after the other in this run).

    python benchmarks/model_families.py [--steps N]

Each figure is the median over the steps after the first two (warm-up). The headline last:
``sparsemixer_vs_topk_step_time=<x>`` (GRIN twin, EP2).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moe_parallel.launch_run import launch_local, plan_train  # noqa: E402

TWINS = {
    "mixtral (moe_tiny)": "moe_tiny.yaml",
    "deepseek": "deepseek_moe_tiny.yaml",
    "grin": "grin_moe_tiny.yaml",
    "yuan": "yuan2_m32_tiny.yaml",
}
EP1 = ["parallel.expert=1", "parallel.data=1"]


def run(config: str, overrides: list[str], steps: int, runs: Path) -> tuple[float, float]:
    launch = plan_train(
        str(REPO / "configs" / "tiny" / config),
        [
            f"train.steps={steps}",
            "train.warmup_steps=1",
            "checkpoint.interval=null",
            "checkpoint.save_at_end=false",
            "log.tensorboard=false",
            *overrides,
        ],
        str(runs),
        None,
        None,
    )
    if launch_local(launch, stream=False) != 0:
        raise SystemExit(f"benchmark run failed: {launch.run_dir}/logs")
    records = [
        json.loads(line) for line in (launch.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    steps_ = [r for r in records if "event" not in r][2:]
    return (
        statistics.median(r["step_time_s"] for r in steps_) * 1000,
        statistics.median(r["tokens_per_s"] for r in steps_),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    runs = Path(tempfile.mkdtemp(prefix="bench-families-"))
    print(f"{'twin':<20} {'layout':<6} {'step ms':>8} {'tokens/s':>9}")
    times = {}
    for name, config in TWINS.items():
        for layout, overrides in (("EP1", EP1), ("EP2", [])):
            ms, tps = run(config, overrides, args.steps, runs)
            times[(name, layout)] = ms
            print(f"{name:<20} {layout:<6} {ms:8.1f} {tps:9.0f}", flush=True)
    print("\nrouter cost: the same twin (EP2) with its router swapped for Megatron's top-k")
    ratios = {}
    for name, config, router in (
        ("grin", "grin_moe_tiny.yaml", "sparsemixer"),
        ("yuan", "yuan2_m32_tiny.yaml", "attention"),
    ):
        topk_ms, _ = run(config, ["model.moe.router=topk"], args.steps, runs)
        ratios[router] = times[(name, "EP2")] / topk_ms
        print(
            f"{name:<6} {router:<12} {times[(name, 'EP2')]:8.1f} ms vs topk {topk_ms:8.1f} ms "
            f"-> x{ratios[router]:.3f}",
            flush=True,
        )
    print(f"attention_router_vs_topk_step_time={ratios['attention']:.3f}")
    print(f"sparsemixer_vs_topk_step_time={ratios['sparsemixer']:.3f}")


if __name__ == "__main__":
    main()
