"""``moectl plan calibrate``: measure this machine and write the hardware profile the planner uses.

On one rank's worth of the machine (one thread on CPU, as the backends start one rank per core
for these measurements; one GPU on GPU) it times, each the fastest of repeats (a shared machine's
other load only ever slows a run down):

- GEMMs over a grid of shapes and the same GEMMs looped over 4 experts (how Megatron's
  SequentialMLP runs a grouped GEMM) -> achieved FLOP/s by the FLOPs of one GEMM (the tables);
- a large copy -> memory bandwidth; a tiny op -> the fixed cost of one op;
- the collectives over message sizes on ``ranks`` real ranks launched as the project launches
  them (cluster.run_local, gloo on CPU, NCCL on GPU; bench/calibrate_collectives.py) -> a latency
  and bus bandwidth per collective (least squares, plan/costs.fit_link);
- on CPU ranks, where host and device time add up, measured training steps (the median of
  HOST_STEPS) to which the model's step-level terms are fitted: a micro MoE model
  (configs/bench/calibration_micro.yaml, ops too small to matter) with 1 and 4 layers on one rank
  -> the host time per layer and per step; a model of middling width
  (configs/bench/calibration_mid.yaml) on one rank -> the bandwidth a step's memory-bound ops
  achieve (far below a plain copy's: every out-of-place op allocates and faults its pages in);
  the micro model under TP2+SP and EP2 with 1 and 4 layers -> the host time per collective call.
  None of these models has a shape of the planner accuracy benchmark's.

One machine has one kind of link: the profile's inter-node links are the measured intra-node
ones (say so in its ``sources``) until a calibration across nodes replaces them.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from moe_parallel.config import load_config
from moe_parallel.plan.costs import fit_link
from moe_parallel.plan.hardware import COLLECTIVES, HardwareProfile, Link

GEMM_SIDES = (16, 32, 64, 128, 256, 512, 1024)
EXPERTS = 4
BENCH_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "bench"
MICRO_CONFIG = BENCH_CONFIGS / "calibration_micro.yaml"
MID_CONFIG = BENCH_CONFIGS / "calibration_mid.yaml"
HOST_LAYERS = (1, 4)  # far apart: the fits divide by their difference
# the two-rank layouts whose collective calls the micro model times (bench/calibrate.py)
COLLECTIVE_LAYOUTS = (
    ["parallel.tensor=2", "parallel.sequence_parallel=true"],
    ["parallel.expert=2", "parallel.data=2"],
)
HOST_STEPS = 16
MEASURE_ROUNDS = 2


def best_time(fn, repeats: int = 7, sync=None) -> float:
    """The fastest of ``repeats`` timings: what the hardware does when others' load (a shared
    machine) leaves it alone for a moment."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - started)
    return min(times)


def op_latency(device: str, dtype) -> float:
    x = torch.ones(8, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else None
    return best_time(lambda: [x.add_(1) for _ in range(100)], sync=sync) / 100


def memory_bandwidth(device: str, dtype) -> float:
    x = torch.ones(16 * 2**20, device=device, dtype=dtype)
    y = torch.empty_like(x)
    sync = torch.cuda.synchronize if device == "cuda" else None
    t = best_time(lambda: y.copy_(x), sync=sync)
    return 2 * x.numel() * x.element_size() / t  # read + write


def gemm_table(device: str, dtype, experts: int) -> list[list[float]]:
    """(FLOPs of one GEMM, achieved FLOP/s, launch included) over the grid, by ascending FLOPs
    (the median where shapes share their FLOPs); ``experts`` > 1: that many GEMMs in a loop,
    the rate of one."""
    sync = torch.cuda.synchronize if device == "cuda" else None
    by_flops: dict[float, list[float]] = {}
    for m in GEMM_SIDES:
        for k in (GEMM_SIDES[0], GEMM_SIDES[len(GEMM_SIDES) // 2], GEMM_SIDES[-1]):
            n = k
            a = [torch.randn(m, k, device=device, dtype=dtype) for _ in range(experts)]
            b = [torch.randn(k, n, device=device, dtype=dtype) for _ in range(experts)]
            t = best_time(lambda: [x @ w for x, w in zip(a, b)], repeats=9, sync=sync)
            flops = 2.0 * m * k * n
            by_flops.setdefault(flops, []).append(flops * experts / t)
    return [[f, statistics.median(r)] for f, r in sorted(by_flops.items())]


def collective_links(ranks: int) -> dict[str, Link]:
    from cluster import RunSpec, run_local

    run_dir = Path(tempfile.mkdtemp(prefix="calibrate-"))
    out = run_dir / "collectives.json"
    spec = RunSpec(
        run_dir=run_dir,
        world_size=ranks,
        entry=[sys.executable, "-m", "moe_parallel.bench.calibrate_collectives", str(out)],
        threads_per_rank=1,
    )
    code = run_local(spec, stream=False)
    if code != 0:
        raise RuntimeError(f"collective calibration in {run_dir} failed with exit code {code}")
    points = json.loads(out.read_text())["points"]
    return {
        name: fit_link(name, ranks, [p[0] for p in points[name]], [p[1] for p in points[name]])
        for name in COLLECTIVES
    }


def predicted(config: Path, overrides: list[str], hw: HardwareProfile) -> float:
    """The planner's step time of ``config`` with ``overrides`` on ``hw``."""
    from moe_parallel.config import load_config
    from moe_parallel.plan.estimate import estimate_step_time
    from moe_parallel.plan.layouts import padded_vocab
    from moe_parallel.plan.memory import Layout

    cfg = load_config(config, overrides)
    if cfg.model.vocab_size is None:
        from moe_parallel.data import prepare

        cfg.model.vocab_size = prepare(cfg.data).vocab_size
    layout = Layout.of(cfg)
    return estimate_step_time(cfg, layout, padded_vocab(cfg, layout), hw).total_s


def measured(runs: list[tuple[Path, tuple[str, ...]]]) -> dict[tuple, float]:
    """The median measured step (the statistic the planner is judged by) of each (config,
    overrides) of ``runs``: HOST_STEPS steps each, the runs taking turns over MEASURE_ROUNDS
    rounds, so that a burst of other load on a shared machine does not fall on one of two
    measurements a fit subtracts."""
    from moe_parallel.bench.step_time import measure_step_times

    times: dict[tuple, list[float]] = {run: [] for run in runs}
    for _ in range(MEASURE_ROUNDS):
        for config, overrides in runs:
            steps = HOST_STEPS // MEASURE_ROUNDS
            times[config, overrides] += measure_step_times(str(config), list(overrides), steps)
    return {run: statistics.median(t) for run, t in times.items()}


def micro_run(layers: int, layout: tuple[str, ...] = ()) -> tuple[Path, tuple[str, ...]]:
    return MICRO_CONFIG, (*layout, f"model.num_layers={layers}")


def host_times(hw: HardwareProfile, steps: dict[tuple, float]) -> tuple[float, float]:
    """Host time per layer and micro-batch, and per step: the micro model's measured steps at
    HOST_LAYERS layers (in ``steps``) minus the ops the model predicts on ``hw`` with no host
    time, solved for the two unknowns."""
    hw = replace(hw, layer_host_s=0.0, step_host_s=0.0, collective_host_s=0.0)
    residual = []
    for layers in HOST_LAYERS:
        config, overrides = micro_run(layers)
        residual.append(steps[config, overrides] - predicted(config, list(overrides), hw))
    micro = load_config(MICRO_CONFIG).num_microbatches
    (l1, r1), (l2, r2) = zip(HOST_LAYERS, residual)
    per_layer = max((r2 - r1) / ((l2 - l1) * micro), 0.0)
    per_step = max(r1 - per_layer * l1 * micro, 0.0)
    return per_layer, per_step


def step_memory_bandwidth(hw: HardwareProfile, mid_step: float) -> float:
    """The memory bandwidth at which the planner predicts the mid model's measured step: what a
    training step's memory-bound ops achieve (allocations and their page faults, strided copies),
    not a plain copy. Bisection in log(bandwidth): the prediction falls as it grows."""
    low, high = math.log(1e7), math.log(hw.memory_bandwidth * 100)
    for _ in range(60):
        mid = (low + high) / 2
        if predicted(MID_CONFIG, [], replace(hw, memory_bandwidth=math.exp(mid))) > mid_step:
            low = mid
        else:
            high = mid
    return math.exp((low + high) / 2)


def collective_host(hw: HardwareProfile, steps: dict[tuple, float]) -> float:
    """Host time per collective call in a step: the micro model under each layout of
    COLLECTIVE_LAYOUTS at HOST_LAYERS layers; the growth of the measured step with the layers
    beyond the predicted one's, over the growth of the collective calls (least squares)."""
    base, unit = replace(hw, collective_host_s=0.0), replace(hw, collective_host_s=1.0)
    num = den = 0.0
    for overrides in COLLECTIVE_LAYOUTS:
        residual, calls = [], []
        for layers in HOST_LAYERS:
            run = micro_run(layers, tuple(overrides))
            p0 = predicted(MICRO_CONFIG, list(run[1]), base)
            residual.append(steps[run] - p0)
            calls.append(predicted(MICRO_CONFIG, list(run[1]), unit) - p0)  # at 1 s per call
        r, a = residual[1] - residual[0], calls[1] - calls[0]
        num, den = num + r * a, den + a * a
    return max(num / den, 0.0)


def fit_step_times(hw: HardwareProfile, collectives: bool = True) -> HardwareProfile:
    """The profile's host times, step memory bandwidth and (``collectives``) collective host
    time fitted to measured steps of the calibration models (CPU ranks: host and device add
    up)."""
    runs = [micro_run(n) for n in HOST_LAYERS] + [(MID_CONFIG, ())]
    if collectives:
        runs += [micro_run(n, tuple(o)) for o in COLLECTIVE_LAYOUTS for n in HOST_LAYERS]
    steps = measured(runs)
    for _ in range(2):  # host time and bandwidth each shift the other's fit a little
        per_layer, per_step = host_times(hw, steps)
        hw = replace(hw, layer_host_s=per_layer, step_host_s=per_step)
        hw = replace(hw, memory_bandwidth=step_memory_bandwidth(hw, steps[MID_CONFIG, ()]))
    return replace(hw, collective_host_s=collective_host(hw, steps)) if collectives else hw


def measure_profile(ranks: int, name: str, links: dict[str, Link] | None = None) -> HardwareProfile:
    """The whole calibration; ``links`` given: those instead of measuring the collectives and
    their host time (which is left at 0)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(1)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    latency = op_latency(device, dtype)
    measure_collectives = links is None
    links = links or collective_links(ranks)
    profile = HardwareProfile(
        name=name,
        gpus_per_node=torch.cuda.device_count() if device == "cuda" else ranks,
        memory_gib=(
            torch.cuda.get_device_properties(0).total_memory / 2**30 if device == "cuda" else 80.0
        ),
        peak_flops=1.0,  # replaced below by the best GEMM rate measured
        gemm=tuple(tuple(r) for r in gemm_table(device, dtype, 1)),
        grouped_gemm=tuple(tuple(r) for r in gemm_table(device, dtype, EXPERTS)),
        memory_bandwidth=memory_bandwidth(device, dtype),
        op_latency_s=latency,
        layer_host_s=0.0,
        step_host_s=0.0,
        collective_host_s=0.0,
        host_overlaps_device=device == "cuda",
        attention="flash" if device == "cuda" else "unfused",
        intra_node=links,
        inter_node=links,
        sources=(
            f"moectl plan calibrate on {device} ({dtype}), {ranks} ranks, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "inter_node = intra_node: measured on one machine",
            "peak_flops = the best GEMM rate measured",
        ),
    )
    profile = replace(profile, peak_flops=max(r[1] for r in profile.gemm))
    if device == "cpu":  # the calibration models' steps run on CPU ranks
        profile = fit_step_times(profile, collectives=measure_collectives)
    return profile


def calibrate_command(out: str | None, ranks: int) -> int:
    if ranks < 2:
        raise ValueError(f"--ranks={ranks}: the collectives need at least 2 ranks")
    profile = measure_profile(
        ranks, "calibrated " + ("GPU" if torch.cuda.is_available() else "CPU")
    )
    text = profile.as_yaml()
    if out:
        Path(out).write_text(text)
        print(f"hardware profile written to {out}")
    else:
        print(text)
    return 0
