"""Small pure cost functions of the step-time model: one op, one collective, one schedule.

An op is timed as ``max(FLOPs / achieved rate at its shape, bytes / memory bandwidth)``, a
memory-bound one as ``op_latency + bytes / memory bandwidth`` (the GEMM tables' rates are
measured whole, launch included, so small GEMMs carry their own fixed cost). A collective over ``n`` ranks of a buffer of ``size`` bytes follows the alpha-beta
model with NCCL-tests' bus-bandwidth convention (nccl-tests doc/PERFORMANCE.md): the time is
``latency x steps + size x factor / bus_bandwidth`` with factor (n - 1) / n for all-gather,
reduce-scatter and all-to-all (``size``: the gathered buffer, or what one rank sends), 2 (n - 1) / n
for all-reduce, 1 for a point-to-point send; steps n - 1 (ring), 2 (n - 1) for all-reduce, 1 for
a send.
"""

from __future__ import annotations

from dataclasses import dataclass

from .hardware import HardwareProfile, Link, interpolate_rate


@dataclass(frozen=True)
class Gemm:
    """``count`` GEMMs [m, k] x [k, n] (a grouped GEMM: one per local expert)."""

    m: float
    k: float
    n: float
    count: int = 1
    grouped: bool = False

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.k * self.n


def gemm_time(g: Gemm, hw: HardwareProfile, bytes_per_value: int) -> float:
    """Forward time of ``g``: compute at the rate of its shape, or its operands' traffic."""
    if g.m <= 0 or g.count == 0:
        return 0.0
    table = hw.grouped_gemm if g.grouped else hw.gemm
    compute = g.flops / interpolate_rate(table, g.flops)
    traffic = (g.m * g.k + g.k * g.n + g.m * g.n) * bytes_per_value / hw.memory_bandwidth
    return g.count * max(compute, traffic)


def memory_op_time(nbytes: float, hw: HardwareProfile, ops: int = 1) -> float:
    """``ops`` memory-bound ops moving ``nbytes`` in all (norms, activations, permutes)."""
    return ops * hw.op_latency_s + nbytes / hw.memory_bandwidth


FACTORS = {
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "p2p": lambda n: 1.0,
}
STEPS = {
    "all_gather": lambda n: n - 1,
    "reduce_scatter": lambda n: n - 1,
    "all_to_all": lambda n: n - 1,
    "all_reduce": lambda n: 2 * (n - 1),
    "p2p": lambda n: 1,
}


def collective_time(collective: str, size: float, group: int, link: Link) -> float:
    """One ``collective`` of ``size`` bytes over ``group`` ranks on ``link`` (0 for one rank)."""
    if group <= 1 and collective != "p2p":
        return 0.0
    steps = STEPS[collective](group)
    return steps * link.latency_s + size * FACTORS[collective](group) / link.bus_bandwidth


def fit_link(collective: str, group: int, sizes: list[float], times: list[float]) -> Link:
    """Latency and bus bandwidth of ``collective`` fitted to measured times by least squares on
    the relative error (small and large messages weigh alike)."""
    steps, factor = STEPS[collective](group), FACTORS[collective](group)
    # t = a * steps + b * size * factor; rows divided by t
    rows = [(steps / t, s * factor / t) for s, t in zip(sizes, times)]
    saa = sum(r[0] * r[0] for r in rows)
    sab = sum(r[0] * r[1] for r in rows)
    sbb = sum(r[1] * r[1] for r in rows)
    sa, sb = sum(r[0] for r in rows), sum(r[1] for r in rows)
    det = saa * sbb - sab * sab
    a = (sa * sbb - sb * sab) / det
    b = (saa * sb - sab * sa) / det
    if a < 0:  # no measurable latency: bandwidth alone
        a, b = 0.0, sb / sbb
    return Link(latency_s=a, bus_bandwidth=1.0 / max(b, 1e-15))


def pipeline_bubble(per_microbatch_s: float, pipeline: int, virtual: int) -> float:
    """Idle time of one rank under 1F1B: (p - 1) micro-batch times (Narayanan et al. 2021,
    Megatron-LM's schedule); interleaving with v chunks divides it by v."""
    return per_microbatch_s * (pipeline - 1) / virtual


def exposed(comm_s: float, overlappable_s: float, overlapped: bool) -> float:
    """What of ``comm_s`` the step waits for: all of it, or (overlapped) what compute of
    ``overlappable_s`` does not hide."""
    return max(comm_s - overlappable_s, 0.0) if overlapped else comm_s
