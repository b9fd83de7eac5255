"""The metrics record of one training step (a line of metrics.jsonl) and its log line."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .moe_stats import imbalance

if TYPE_CHECKING:
    from .step import StepResult


def step_record(step: int, result: StepResult, elapsed_s: float, loads: dict) -> dict:
    """``loads``: the step's expert-load numbers (ExpertLoad.collect), empty without MoE."""
    record = {
        "step": step,
        "loss": result.lm_loss,
        "lm_loss": result.lm_loss,
        "lr": result.lr,
        "grad_norm": result.grad_norm,
        "step_time_s": elapsed_s,
        "tokens_per_s": result.num_tokens / elapsed_s,
        "num_tokens": result.num_tokens,
        "skipped": result.skipped,
    }
    if loads:
        record.update(moe_fields(loads))
    return record


def moe_fields(loads: dict) -> dict:
    out = {f"moe/{k}": v for k, v in loads.items() if k not in ("tokens_per_expert", "mtp_loss")}
    if "mtp_loss" in loads:  # multi-token prediction's mean loss (model.mtp_layers)
        out["mtp_loss"] = loads["mtp_loss"]
    out["moe/tokens_per_expert"] = loads["tokens_per_expert"]
    per_layer = imbalance(loads["tokens_per_expert"])
    out["moe/imbalance"] = per_layer
    if per_layer:
        out["moe/imbalance_max"] = max(per_layer.values())
    if "load_balancing_loss" in loads:
        out["aux_loss"] = loads["load_balancing_loss"]
    return out


def summary_line(r: dict, total_steps: int) -> str:
    parts = [f"step {r['step']}/{total_steps}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}"]
    if r.get("grad_norm") is not None:
        parts.append(f"grad {r['grad_norm']:.3f}")
    if "aux_loss" in r:
        parts.append(f"aux {r['aux_loss']:.3f}")
    if "moe/imbalance_max" in r:
        parts.append(f"imbalance {r['moe/imbalance_max']:.2f}")
    parts.append(f"{r['tokens_per_s']:.0f} tok/s")
    parts.append(f"{r['step_time_s'] * 1000:.0f} ms")
    return " | ".join(parts)
