"""The goodput simulator (moe_parallel/goodput): against Daly's closed form, its limits, its
monotonicity in the failure rate, its costs from the project, and its input errors."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cluster.profile import load_profile
from launch.cli import main
from moe_parallel.config import load_config
from moe_parallel.goodput.costs import (
    GoodputInputError,
    ScaleChoices,
    at_scale,
    process_start_s,
    recovery_costs,
    shrunk_fraction,
)
from moe_parallel.goodput.failures import (
    LLAMA3_COMPONENTS,
    LLAMA3_GPU_HOURS,
    Component,
    FailureInputError,
    FailureModel,
    load_failure_model,
)
from moe_parallel.goodput.simulate import (
    FailureDraws,
    RecoveryCosts,
    best_interval,
    daly_ettr,
    draw_failures,
    replacement_waits,
    simulate,
)

MIXTRAL = "configs/models/mixtral_8x7b.yaml"
MTBF_S = 10_000.0


def fixed_costs(blocking: float, **more) -> RecoveryCosts:
    """Recovery 100 s in all (10 detection + 50 start + 20 init + 20 load), no replacement."""
    return RecoveryCosts(
        detect_crash_s=10,
        detect_hang_s=600,
        replacement_delay_s=0,
        process_start_s=50,
        process_group_init_s=20,
        load_s=20,
        save_blocking_s=blocking,
        save_write_s=blocking,
        **more,
    )


def one_component(gpus: int = 1000) -> FailureModel:
    """Exponential failures with a cluster MTBF of 10,000 s on ``gpus`` GPUs."""
    return FailureModel((Component("x", 3600 / MTBF_S / gpus),))


def closed_form_best(blocking: float, recovery: float) -> float:
    """Daly's ETTR maximised on a fine grid (0.005% steps)."""
    tau, lam = np.geomspace(10, 1e5, 200_001), 1 / MTBF_S
    values = lam * tau * np.exp(-lam * recovery) / np.expm1(lam * (tau + blocking))
    return float(tau[int(np.argmax(values))])


@pytest.mark.parametrize("blocking", [60.0, 5.0])
def test_exponential_failures_match_the_closed_form(blocking):
    model, costs = one_component(), fixed_costs(blocking)
    draws = draw_failures(model, 1000, days=250, runs=40, seed=3)  # ~2,160 failures a run
    for interval in (300.0, 1000.0, 3000.0):
        simulated = simulate(model, costs, draws, interval).ettr
        exact = daly_ettr(1 / MTBF_S, 100, blocking, interval)
        assert simulated == pytest.approx(exact, rel=0.02)
        assert abs(simulated - exact) < 0.003
    best, _ = best_interval(model, costs, draws, shortest_s=blocking)
    exact_best = closed_form_best(blocking, 100)
    assert best == pytest.approx(exact_best, rel=0.02)
    assert simulate(model, costs, draws, best).ettr == pytest.approx(
        daly_ettr(1 / MTBF_S, 100, blocking, exact_best), rel=0.02
    )


def test_without_failures_only_the_saves_cost():
    model = FailureModel((Component("x", 1e-15),))
    draws = draw_failures(model, 8, days=1, runs=5, seed=0)
    out = simulate(model, fixed_costs(10.0), draws, 3590.0)  # 24 segments of 3,600 s a day
    assert out.failures_per_run == 0
    assert out.ettr == pytest.approx(1 - 10 / 3600, abs=1e-12)
    assert out.lost_hours["save_blocking"] == pytest.approx(24 * 10 / 3600)


@pytest.mark.parametrize("mode", ["restart", "elastic"])
def test_doubling_the_failure_rate_never_raises_ettr(mode):
    model = FailureModel(LLAMA3_COMPONENTS)
    costs = replace(
        fixed_costs(2.0, mode=mode, wait_for_capacity_s=120, shrunk_fraction=0.5),
        replacement_delay_s=600,
    )
    once = draw_failures(model, 16_384, days=54, runs=200, seed=1)
    twice = draw_failures(model.scaled(2), 16_384, days=54, runs=200, seed=1)
    for interval in (30.0, 300.0, 3000.0):
        assert (
            simulate(model.scaled(2), costs, twice, interval).ettr
            < simulate(model, costs, once, interval).ettr
        )
    assert twice.mtbf_s == pytest.approx(once.mtbf_s / 2)


def test_llama3_rates_add_up_to_its_interruptions():
    rates = {c.name: c.rate_per_gpu_hour * LLAMA3_GPU_HOURS for c in LLAMA3_COMPONENTS}
    assert sum(rates.values()) == pytest.approx(466)
    assert sum(v for k, v in rates.items() if k != "planned") == pytest.approx(419)
    assert rates["hbm"] == pytest.approx(72)


@pytest.mark.parametrize("rate", [0, -1e-6, "fast"])
def test_a_rate_that_is_not_positive_is_refused_naming_the_field(tmp_path, rate):
    path = tmp_path / "rates.yaml"
    path.write_text(f"components:\n  hbm: {{rate_per_gpu_hour: {rate}}}\n")
    with pytest.raises(FailureInputError, match=r"components\.hbm\.rate_per_gpu_hour="):
        load_failure_model(path)


def test_a_rates_override_keeps_the_other_components(tmp_path):
    path = tmp_path / "rates.yaml"
    path.write_text("components:\n  hbm: {rate_per_gpu_hour: 1.0e-5}\n")
    model = load_failure_model(path)
    rates = {c.name: c.rate_per_gpu_hour for c in model.components}
    assert rates["hbm"] == 1e-5 and len(rates) == len(LLAMA3_COMPONENTS)


def run_cli(capsys, *args: str) -> tuple[int, str]:
    rc = main(["goodput", MIXTRAL, *args])
    return rc, capsys.readouterr().err.strip()


def test_a_cluster_smaller_than_one_replica_is_refused(capsys):
    rc, err = run_cli(capsys, "--gpus", "4", "--days", "1")
    assert rc == 2 and "\n" not in err
    assert "--gpus=4" in err and "8 GPUs" in err


def test_an_interval_shorter_than_a_save_is_refused(capsys):
    rc, err = run_cli(capsys, "--gpus", "64", "--days", "1", "--interval", "0.001", "--runs", "5")
    assert rc == 2 and "\n" not in err
    assert "--interval=0.001" in err and "shorter than one save" in err


def test_a_config_interval_shorter_than_a_save_names_checkpoint_interval(capsys):
    # 64 GPUs, synchronous saves: a node writes 8 ranks' ~5 GB at 0.977 GB/s, ~43 s, while one
    # step is ~17 s by the planner's estimate
    rc, err = run_cli(capsys, "--gpus", "64", "--days", "1", "checkpoint.interval=1")
    assert rc == 2 and "\n" not in err
    assert err.startswith("moectl: error: checkpoint.interval=1 steps")


def measured_costs(tmp_path) -> Path:
    """A results file with a SLURM restart of 20 s and an async blocking ratio of 0.05."""
    measured = tmp_path / "costs.json"
    measured.write_text(
        json.dumps(
            {
                "slurm_latency": {"stopped_to_restart_s": 11.0, "restart_to_step_s": 9.0},
                "checkpoint_save": {"async_blocking_ratio": 0.05},
            }
        )
    )
    return measured


def test_costs_come_from_the_measured_file_and_the_planner(tmp_path):
    measured = measured_costs(tmp_path)
    cfg = at_scale(load_config(MIXTRAL, ["checkpoint.async_save=true"]), 1024)
    profile = load_profile(None, ["storage.bandwidth_per_node_gb_s=2.0"])
    costs = recovery_costs(cfg, profile, ScaleChoices(1024, measured=measured))
    assert costs.process_start_s == 20.0
    assert costs.process_group_init_s == pytest.approx(0.003 * 1024)
    load_bytes = costs.sources["load_bytes_per_rank"]
    assert costs.load_s == pytest.approx(load_bytes * 8 / 2e9)
    assert costs.save_blocking_s == pytest.approx(0.05 * costs.save_write_s)
    assert costs.detect_hang_s == cfg.monitor.hang_timeout
    # a rank holds ~46.7B params / (EP8 x TP2 x PP4 for experts): a few GB of bf16 weights
    assert 1e9 < load_bytes < 5e9


def test_a_missing_measurement_names_the_benchmark(tmp_path):
    with pytest.raises(GoodputInputError, match=r"ray_latency\.py --record"):
        process_start_s(ScaleChoices(8, "ray", measured=tmp_path / "none.json"))


def test_elastic_shrinks_to_the_next_data_parallel_size_the_batch_allows():
    cfg = load_config(MIXTRAL, [])
    # 2,048 replicas, global batch 2,048: only powers of two divide it, so a lost node
    # (4 replicas' ranks at TP2) halves the run; a batch of 3 x 2,048 allows 1,536 replicas.
    assert shrunk_fraction(at_scale(cfg, 16_384, mode="elastic"), 8) == 0.5
    assert shrunk_fraction(at_scale(cfg, 16_384, 3 * 2048, "elastic"), 8) == 0.75
    assert shrunk_fraction(at_scale(cfg, 16_384, mode="restart"), 8) == 1.0
    assert math.isclose(at_scale(cfg, 16_384).train.global_batch_size, 2048)


def test_the_json_report_is_the_same_for_a_seed_and_adds_up(capsys):
    args = ["--gpus", "1024", "--days", "30", "--runs", "40", "--seed", "7", "--json"]
    outputs = []
    for _ in range(2):
        assert main(["goodput", MIXTRAL, *args, "checkpoint.async_save=true"]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    first, second = outputs
    assert first["best"] == second["best"] and first["best_interval_s"] == second["best_interval_s"]
    best = first["best"]
    assert best["useful_hours"] + sum(best["lost_hours"].values()) == pytest.approx(30 * 24)
    assert 0.9 < best["ettr"] < 1
    assert first["layout"] == "TP2 PP4 CP1 EP8 DP128"
    # the config's interval (1,000 steps) is worse than the best one found
    assert first["at_interval"]["ettr"] <= best["ettr"]


def test_llama3_rates_give_its_interruptions_on_its_cluster():
    draws = draw_failures(FailureModel(LLAMA3_COMPONENTS), 16_384, days=54, runs=400, seed=2)
    counts = np.isfinite(draws.times).sum(axis=1)
    assert counts.mean() == pytest.approx(466, rel=0.01)
    assert draws.mtbf_s / 3600 == pytest.approx(54 * 24 / 466)


@pytest.mark.parametrize(
    "mode, useful",
    [
        # 1,000 s kept before the failure at 1,050 s (50 s since the checkpoint lost); then
        # restart: detection 2 + replacement 600 + start 20 + init 10 + load 15 = 647 s down
        ("restart", 1000 + 8950 - 647),
        # elastic: 2 + wait 100 + 45 = 147 s down, 500 s at half speed (250 s of work lost),
        # 45 s to grow back, then full speed to the end
        ("elastic", 1000 + 250 + 8950 - 147 - 500 - 45),
    ],
)
def test_one_node_loss_costs_what_its_stages_add_up_to(mode, useful):
    model = FailureModel((Component("node", 1e-3, replace=True),))
    draws = FailureDraws(
        times=np.array([[1050.0, np.inf]]),
        kinds=np.zeros((1, 2), int),
        horizon_s=10_000,
        rate_per_s=1,
    )
    costs = RecoveryCosts(
        detect_crash_s=2,
        detect_hang_s=600,
        replacement_delay_s=600,
        process_start_s=20,
        process_group_init_s=10,
        load_s=15,
        save_blocking_s=0,
        save_write_s=0,
        mode=mode,
        wait_for_capacity_s=100,
        shrunk_fraction=0.5,
    )
    out = simulate(model, costs, draws, interval_s=100.0)
    assert out.ettr == pytest.approx(useful / 10_000)
    assert out.lost_hours["recompute"] == pytest.approx(50 / 3600)
    assert out.lost_hours["reduced_capacity"] == pytest.approx(
        (250 if mode == "elastic" else 0) / 3600
    )


def node_losses(times: list[float]) -> tuple[FailureModel, FailureDraws]:
    """One run whose failures at ``times`` each take a node out of the job."""
    model = FailureModel((Component("node", 1e-3, replace=True),))
    draws = FailureDraws(
        times=np.array([[*times, np.inf]]),
        kinds=np.zeros((1, len(times) + 1), int),
        horizon_s=10_000,
        rate_per_s=1,
    )
    return model, draws


@pytest.mark.parametrize(
    "spares, waits",
    [
        (0, [600, 600, 600]),  # every lost node waits for its replacement
        # the spare replaces the node lost at 100 s; the one lost at 200 s waits for the first
        # back from repair (700 s), and the spare refilled at 800 s covers the loss at 5,000 s
        (1, [0, 500, 0]),
        (2, [0, 0, 0]),
    ],
)
def test_a_spare_replaces_a_lost_node_until_the_pool_is_empty(spares, waits):
    model, draws = node_losses([100.0, 200.0, 5000.0])
    costs = replace(fixed_costs(0.0), replacement_delay_s=600, spare_nodes=spares)
    assert replacement_waits(model, costs, draws)[0, :3].tolist() == waits


@pytest.mark.parametrize("mode", ["restart", "elastic"])
def test_a_large_spare_pool_costs_a_restart_without_replacement_delay(mode):
    model = FailureModel((Component("node", 3600 / MTBF_S / 1000, replace=True),))
    draws = draw_failures(model, 1000, days=250, runs=40, seed=3)
    waiting = fixed_costs(5.0, mode=mode, wait_for_capacity_s=120, shrunk_fraction=0.5)
    waiting = replace(waiting, replacement_delay_s=600)
    pooled = simulate(model, replace(waiting, spare_nodes=10**6), draws, 1000.0)
    # independently: Daly's closed form with the 100 s of recovery and no wait
    assert pooled.ettr == pytest.approx(daly_ettr(1 / MTBF_S, 100, 5.0, 1000.0), rel=0.02)
    no_delay = simulate(model, replace(waiting, replacement_delay_s=0), draws, 1000.0)
    assert pooled.ettr == no_delay.ettr
    assert simulate(model, waiting, draws, 1000.0).ettr < pooled.ettr - 0.03


# simulate() before spares existed, LLAMA3 rates on 16,384 GPUs, seed 7, 50 runs, interval 300 s
BEFORE_SPARES = {
    "restart": (
        0.9216796330824946,
        {"waiting": 57.17239700359133, "recompute": 16.405782941476865},
    ),
    "elastic": (
        0.9282304658248605,
        {"waiting": 11.704724957923938, "reduced_capacity": 27.6222380023899},
    ),
}


@pytest.mark.parametrize("mode", ["restart", "elastic"])
def test_without_spares_the_results_are_those_from_before_spares(mode):
    model = FailureModel(LLAMA3_COMPONENTS)
    draws = draw_failures(model, 16_384, days=54, runs=50, seed=7)
    costs = fixed_costs(2.0, mode=mode, wait_for_capacity_s=120, shrunk_fraction=0.5)
    out = simulate(model, replace(costs, replacement_delay_s=600), draws, 300.0)
    ettr, lost = BEFORE_SPARES[mode]
    assert out.ettr == pytest.approx(ettr, rel=1e-12)
    for cause, hours in lost.items():
        assert out.lost_hours[cause] == pytest.approx(hours, rel=1e-12)


@pytest.mark.parametrize("mode", ["restart", "elastic"])
def test_more_spares_never_lower_ettr(mode):
    model = FailureModel(LLAMA3_COMPONENTS)
    draws = draw_failures(model, 16_384, days=54, runs=100, seed=4)
    costs = fixed_costs(2.0, mode=mode, wait_for_capacity_s=120, shrunk_fraction=0.5)
    costs = replace(costs, replacement_delay_s=3600)  # long repairs: the pool runs dry at times
    ettr = [simulate(model, replace(costs, spare_nodes=n), draws, 300.0).ettr for n in range(5)]
    assert all(a <= b for a, b in zip(ettr, ettr[1:])), ettr
    assert ettr[1] > ettr[0] + 0.02 and ettr[4] > ettr[1]


def test_spares_come_from_the_profile_unless_given(tmp_path):
    measured = measured_costs(tmp_path)
    cfg = at_scale(load_config(MIXTRAL, []), 1024)
    profile = load_profile(None, ["slurm.spare_nodes=3"])
    assert recovery_costs(cfg, profile, ScaleChoices(1024, measured=measured)).spare_nodes == 3
    given = ScaleChoices(1024, measured=measured, spare_nodes=1)
    assert recovery_costs(cfg, profile, given).spare_nodes == 1
    with pytest.raises(GoodputInputError, match=r"^--spares=-1: must be a whole number"):
        recovery_costs(cfg, profile, replace(given, spare_nodes=-1))
