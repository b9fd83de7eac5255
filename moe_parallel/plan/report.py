"""``moectl plan`` output: the config's own layout's memory, or the layout search for N GPUs."""

from __future__ import annotations

import json

from ..config import RunConfig
from .estimate import Overlap, estimate_step_time
from .hardware import HardwareProfile, ProfileError
from .layouts import node_message, padded_vocab, search_layouts
from .memory import FRAMEWORK_OVERHEAD_BYTES, GiB, Layout, estimate_memory


def plan_report(
    cfg: RunConfig,
    facts: dict | None,
    gpus: int | None,
    gpu_memory_gib: float,
    top: int,
    as_json: bool,
    hw: HardwareProfile,
    overlap: Overlap = Overlap(),
) -> int:
    if gpus is None:
        layout = Layout.of(cfg)
        if layout.tensor > hw.gpus_per_node:
            raise ProfileError(node_message(layout, hw))
        memory = estimate_memory(cfg)
        step = estimate_step_time(cfg, layout, padded_vocab(cfg, layout), hw, overlap)
        if as_json:
            print(
                json.dumps(
                    {
                        **(facts or {}),
                        "memory": memory.as_dict(),
                        "fits": memory.peak_bytes <= gpu_memory_gib * GiB,
                        "hardware": hw.name,
                        "time": step.as_dict(),
                    },
                    indent=1,
                )
            )
            return 0
        w = memory.worst
        print(
            f"memory per GPU ({memory.layout.describe()}, micro-batch "
            f"{cfg.train.micro_batch_size}, {cfg.train.precision}): {w.total / GiB:.2f} GiB on "
            f"stage {w.pp_rank} = weights {w.weights / GiB:.2f} + gradients {w.grads / GiB:.2f} "
            f"+ optimizer {w.optimizer / GiB:.2f} + activations {w.activations / GiB:.2f} "
            f"({w.inflight_microbatches} micro-batches in flight) + transient "
            f"{w.transient / GiB:.2f} + overhead {FRAMEWORK_OVERHEAD_BYTES / GiB:.2f}; "
            f"{'fits' if w.total <= gpu_memory_gib * GiB else 'does NOT fit'} in "
            f"{gpu_memory_gib:g} GiB"
        )
        print(f"step time on {hw.name} (per-op model): {step.total_s:.3f} s ({_split(step)})")
        return 0
    result = search_layouts(cfg, gpus, gpu_memory_gib, hw=hw, overlap=overlap)
    if as_json:
        print(json.dumps({**(facts or {}), "search": result.as_dict(top)}, indent=1))
        return 0
    _print_table(cfg, result, top, hw)
    return 0 if result.fitting else 1


def _split(step) -> str:
    parts = step.as_dict()
    parts.pop("step_s")
    return ", ".join(f"{k.removesuffix('_s')} {v:.3f}" for k, v in parts.items() if v)


def model_flops_utilisation(cfg: RunConfig, step_s: float, gpus: int, hw: HardwareProfile) -> float:
    from .params import describe

    return describe(cfg)["train_flops_per_step"] / (step_s * gpus * hw.peak_flops)


def _print_table(cfg: RunConfig, result, top: int, hw: HardwareProfile) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped: do not squeeze the table to 80 columns
        console = Console(width=180)
    table = Table(
        title=f"{cfg.name}: layouts for {result.gpus} GPUs of {result.gpu_memory_gib:g} "
        f"GiB, fastest first ({len(result.fitting)} fit; step time of the per-op model on "
        f"{hw.name})"
    )
    for col in (
        "layout",
        "mbs",
        "recompute",
        "GiB/GPU",
        "weights",
        "grads",
        "optim",
        "activ",
        "step s",
        "MFU",
        "bubble",
        "EP a2a",
        "TP",
        "PP",
        "DP",
    ):
        table.add_column(
            col, justify="left" if col in ("layout", "recompute") else "right", no_wrap=True
        )
    for c in result.fitting[:top]:
        w, t = c.memory.worst, c.time
        table.add_row(
            c.layout.describe(),
            str(c.layout.micro_batch_size),
            c.layout.recompute,
            f"{w.total / GiB:.1f}",
            f"{w.weights / GiB:.1f}",
            f"{w.grads / GiB:.1f}",
            f"{w.optimizer / GiB:.1f}",
            f"{w.activations / GiB:.1f}",
            f"{t.total_s:.2f}",
            f"{model_flops_utilisation(cfg, t.total_s, result.gpus, hw):.0%}",
            f"{t.bubble_s:.2f}",
            f"{t.ep_comm_s:.2f}",
            f"{t.tp_comm_s:.2f}",
            f"{t.pp_comm_s:.2f}",
            f"{t.dp_comm_s:.2f}",
        )
    console.print(table)
    if result.rejected:
        rejected = Table(title=f"rejected layouts ({sum(result.rejected.values())})")
        rejected.add_column("count", justify="right")
        rejected.add_column("reason")
        rejected.add_column("example")
        for reason, n in result.rejected.most_common():
            rejected.add_row(str(n), reason, result.examples[reason])
        console.print(rejected)
