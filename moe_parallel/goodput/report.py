"""``moectl goodput CONFIG --gpus N --days D``: ETTR, hours lost by cause, the best checkpoint
interval against Young/Daly's, and plots of ETTR against the interval and the cluster size."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from cluster.profile import load_profile, split_overrides

from ..config import RunConfig, load_config
from ..plan.estimate import estimate_step_time
from ..plan.hardware import default_profile
from ..plan.memory import Layout
from .costs import (
    GoodputInputError,
    ScaleChoices,
    at_scale,
    padded_vocab,
    recovery_costs,
    replica_size,
)
from .failures import FailureModel, load_failure_model
from .simulate import (
    HOUR,
    RecoveryCosts,
    best_interval,
    draw_failures,
    simulate,
    young_daly_interval,
)


@dataclass(frozen=True)
class GoodputRequest:
    config: str
    gpus: int
    days: float
    overrides: list[str] = field(default_factory=list)
    cluster: str | None = None  # cluster profile YAML (storage bandwidth)
    rates: str | None = None  # failure rates YAML (default: Llama 3's)
    interval_s: float | None = None  # None: the config's checkpoint.interval x the step time
    runs: int = 1000
    seed: int = 0
    choices: ScaleChoices | None = None  # None: ScaleChoices(gpus)
    global_batch_size: int | None = None
    recovery_mode: str | None = None  # restart or elastic (None: the config's)
    plot: Path | None = None  # a PNG of ETTR against interval and cluster size


def check_request(req: GoodputRequest) -> None:
    for name, value in (("--days", req.days), ("--runs", req.runs)):
        if not value > 0:
            raise GoodputInputError(f"{name}={value}: must be > 0")


def step_seconds(cfg: RunConfig) -> float:
    """The planner's step time estimate (plan/estimate.py) on the shipped H100 SXM profile."""
    return estimate_step_time(cfg, Layout.of(cfg), padded_vocab(cfg), default_profile()).total_s


def scenario(req: GoodputRequest, gpus: int) -> tuple[RunConfig, RecoveryCosts, float]:
    """(the config at ``gpus``, its recovery costs, its step time)."""
    run_overrides, profile_overrides = split_overrides(req.overrides)  # storage.* -> profile
    base = load_config(req.config, run_overrides)
    if base.model.vocab_size is None:
        raise GoodputInputError("model.vocab_size is not set: give it (or model.vocab_size=N)")
    cfg = at_scale(base, gpus, req.global_batch_size, req.recovery_mode)
    choices = replace(req.choices or ScaleChoices(gpus), gpus=gpus)
    profile = load_profile(req.cluster, profile_overrides)
    return cfg, recovery_costs(cfg, profile, choices), step_seconds(cfg)


def evaluate(
    model: FailureModel, costs: RecoveryCosts, gpus: int, step_s: float, req: GoodputRequest
) -> dict:
    draws = draw_failures(model, gpus, req.days, req.runs, req.seed)
    shortest = max(costs.save_write_s, step_s)
    best_s, curve = best_interval(model, costs, draws, shortest)
    best = simulate(model, costs, draws, best_s)
    return {
        "mtbf_hours": draws.mtbf_s / HOUR,
        "young_daly_interval_s": young_daly_interval(costs.save_blocking_s, draws.mtbf_s),
        "best_interval_s": best_s,
        "best_interval_steps": best_s / step_s,
        "best": best.as_dict(),
        "curve": [(o.interval_s, o.ettr) for o in curve],
        "_draws": draws,
    }


def goodput(req: GoodputRequest) -> dict:
    """Everything ``moectl goodput`` prints (``--json``), plus the PNG when ``req.plot``."""
    check_request(req)
    model = load_failure_model(req.rates)
    cfg, costs, step_s = scenario(req, req.gpus)
    interval, given = req.interval_s, f"--interval={req.interval_s} s"
    if interval is None and cfg.checkpoint.interval:
        interval = cfg.checkpoint.interval * step_s
        given = f"checkpoint.interval={cfg.checkpoint.interval} steps ({interval:.3g} s)"
    if interval is not None and interval < costs.save_write_s:
        raise GoodputInputError(
            f"{given} is shorter than one save ({costs.save_write_s:.3g} s): "
            "a save must finish before the next one starts"
        )
    result = evaluate(model, costs, req.gpus, step_s, req)
    draws = result.pop("_draws")
    at = simulate(model, costs, draws, interval).as_dict() if interval else None
    p = cfg.parallel
    result.update(
        config=cfg.name,
        gpus=req.gpus,
        days=req.days,
        runs=req.runs,
        seed=req.seed,
        layout=f"TP{p.tensor} PP{p.pipeline} CP{p.context} EP{p.expert} DP{p.data}",
        global_batch_size=cfg.train.global_batch_size,
        step_s=step_s,
        recovery=costs.as_dict(),
        failures=model.to_dict(),
        at_interval=at,
        dominant_cost=max(result["best"]["lost_hours"].items(), key=lambda kv: kv[1])[0],
    )
    if req.plot is not None:
        result["by_cluster_size"] = size_sweep(req, model)
        from .plots import plot_goodput

        result["plot"] = str(plot_goodput(result, req.plot))
    return result


def size_sweep(req: GoodputRequest, model: FailureModel) -> list[dict]:
    """Best ETTR at cluster sizes from 1/64 to twice ``req.gpus`` (those the config allows)."""
    out = []
    replica = replica_size(load_config(req.config, split_overrides(req.overrides)[0]))
    for factor in (1 / 64, 1 / 16, 1 / 4, 1 / 2, 1, 2):
        gpus = int(req.gpus * factor)
        if gpus < replica or gpus % replica:  # sizes the layout cannot take
            continue
        try:
            _, costs, step_s = scenario(req, gpus)
        except GoodputInputError as exc:  # a size the config's rules refuse: shown, not drawn
            out.append({"gpus": gpus, "refused": str(exc)})
            continue
        r = evaluate(model, costs, gpus, step_s, replace(req, runs=max(req.runs // 4, 50)))
        out.append({"gpus": gpus, "ettr": r["best"]["ettr"], "interval_s": r["best_interval_s"]})
    return out


def format_goodput(r: dict) -> str:
    best, rec = r["best"], r["recovery"]
    lines = [
        f"{r['config']} on {r['gpus']} GPUs ({r['layout']}, global batch "
        f"{r['global_batch_size']}, step {r['step_s']:.2f} s), {r['days']:g} days, "
        f"{r['runs']} runs (seed {r['seed']}), recovery {rec['mode']}, "
        f"{rec['spare_nodes']} spare node(s)",
        f"failures: MTBF {r['mtbf_hours']:.2f} h, {best['failures_per_run']:.0f} per run",
        "costs (s): "
        + ", ".join(
            f"{k.removesuffix('_s')} {rec[k]:.3g}"
            for k in (
                "detect_crash_s",
                "detect_hang_s",
                "replacement_delay_s",
                "process_start_s",
                "process_group_init_s",
                "load_s",
                "save_write_s",
                "save_blocking_s",
            )
        ),
    ]
    if rec["mode"] == "elastic":
        lines.append(
            f"elastic: waits {rec['wait_for_capacity_s']:g} s, then runs at "
            f"{rec['shrunk_fraction']:.3f} of its throughput until the replacement"
        )
    if r["at_interval"]:
        at = r["at_interval"]
        lines.append(f"ETTR at interval {at['interval_s']:.0f} s: {at['ettr']:.4f}")
    lines += [
        f"best interval {r['best_interval_s']:.1f} s ({r['best_interval_steps']:.1f} steps); "
        f"Young/Daly sqrt(2 x {rec['save_blocking_s']:.3g} s x MTBF) = "
        f"{r['young_daly_interval_s']:.1f} s",
        f"ETTR at the best interval: {best['ettr']:.4f} "
        f"(runs' 5-95%: {best['ettr_p05']:.4f}-{best['ettr_p95']:.4f})",
        f"hours lost per run of {best['hours']:.0f} h, by cause:",
    ]
    for cause, hours in sorted(best["lost_hours"].items(), key=lambda kv: -kv[1]):
        if hours > 0:
            lines.append(f"  {cause:20s} {hours:9.2f} h  ({hours / best['hours']:.2%})")
    lines.append(f"dominant cost: {r['dominant_cost']}")
    for size in r.get("by_cluster_size", []):
        if "refused" in size:
            lines.append(f"  {size['gpus']} GPUs: refused: {size['refused']}")
        else:
            lines.append(f"  {size['gpus']} GPUs: best ETTR {size['ettr']:.4f}")
    if "plot" in r:
        lines.append(f"plot: {r['plot']}")
    return "\n".join(lines)
