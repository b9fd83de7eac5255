"""The hardware profile the step-time model (plan/estimate.py) reads: one dataclass, its YAML.

A profile says how fast one accelerator (or one CPU rank) runs the ops of a training step and how
fast its collectives move data:

- ``gemm`` / ``grouped_gemm``: achieved FLOP/s of one GEMM (one expert's GEMM of a grouped GEMM)
  as a table of (FLOPs of that GEMM, FLOP/s), interpolated linearly in log(FLOPs) and clamped at
  the ends: small GEMMs (heavy TP, fine-grained experts) run at a lower rate than large ones;
- ``memory_bandwidth``: achieved bytes/s of memory-bound ops (norms, activations, permutes);
- ``op_latency_s``: the fixed cost of launching one op;
- ``layer_host_s`` / ``step_host_s``: host time of one transformer layer's forward + backward on
  one micro-batch beyond its kernels (Python, autograd, Megatron's modules) and of one step
  (optimizer loop, schedule, loss reduction); ``host_overlaps_device``: on GPUs the host runs
  ahead of the kernels (a layer takes max(host, device)), on CPUs they add up;
- ``collective_host_s``: host time of one collective call inside a training step beyond the
  collective's own time (Megatron's region functions, waiting on the peers), counted with the
  layer's host time;
- ``intra_node`` / ``inter_node``: per collective (all_gather, reduce_scatter, all_reduce,
  all_to_all, p2p) a latency and a bus bandwidth (NCCL-tests' convention, see plan/costs.py);
  a group whose ranks sit in one node of ``gpus_per_node`` uses ``intra_node``.

``moectl plan calibrate`` measures one (moe_parallel/bench/calibrate.py); configs/hardware/ holds
datasheet-based ones for H100 and H200 SXM.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

COLLECTIVES = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "p2p")
ATTENTION_KERNELS = ("flash", "unfused")


class ProfileError(ValueError):
    """A hardware profile that cannot be used (the message names the field)."""


@dataclass(frozen=True)
class Link:
    """One collective over one kind of link: ``latency_s`` per step, ``bus_bandwidth`` bytes/s."""

    latency_s: float
    bus_bandwidth: float


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    gpus_per_node: int
    memory_gib: float
    peak_flops: float  # datasheet dense peak, for the MFU the report shows
    gemm: tuple[tuple[float, float], ...]  # (FLOPs of one GEMM, achieved FLOP/s), ascending
    grouped_gemm: tuple[tuple[float, float], ...]  # (FLOPs of one expert's GEMM, FLOP/s)
    memory_bandwidth: float
    op_latency_s: float
    layer_host_s: float
    step_host_s: float
    collective_host_s: float
    host_overlaps_device: bool
    attention: str  # "flash" (causal FLOPs, no score tensor) or "unfused"
    intra_node: dict[str, Link]
    inter_node: dict[str, Link]
    sources: tuple[str, ...] = ()

    def link(self, collective: str, group: int, stride: int) -> Link:
        """The link of a group of ``group`` ranks ``stride`` apart in rank order."""
        inside = group * stride <= self.gpus_per_node or group == 1
        return (self.intra_node if inside else self.inter_node)[collective]

    def as_yaml(self) -> str:
        data = asdict(self)
        data["gemm"] = [list(p) for p in self.gemm]
        data["grouped_gemm"] = [list(p) for p in self.grouped_gemm]
        data["sources"] = list(self.sources)
        return yaml.safe_dump(data, sort_keys=False)


def interpolate_rate(table: tuple[tuple[float, float], ...], flops: float) -> float:
    """Achieved FLOP/s at ``flops`` from a (FLOPs, FLOP/s) table: linear in log(FLOPs)."""
    if flops <= table[0][0]:
        return table[0][1]
    for (x0, y0), (x1, y1) in zip(table, table[1:]):
        if flops <= x1:
            w = (math.log(flops) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + w * (y1 - y0)
    return table[-1][1]


OVERLAP_KINDS = ("grad_reduce", "param_gather", "expert_comm")


def parse_overlap(text: str):
    """``--overlap grad_reduce,param_gather`` as an estimate.Overlap."""
    from .estimate import Overlap

    kinds = [k.strip() for k in text.split(",") if k.strip()]
    for kind in kinds:
        if kind not in OVERLAP_KINDS:
            raise ProfileError(f"--overlap {kind!r}; allowed: {list(OVERLAP_KINDS)}")
    return Overlap(**{k: True for k in kinds})


# ---------------------------------------------------------------- reading a profile

HARDWARE_DIR = Path(__file__).resolve().parents[2] / "configs" / "hardware"
DEFAULT_PROFILE = HARDWARE_DIR / "h100_sxm.yaml"


@functools.lru_cache(maxsize=1)
def default_profile() -> HardwareProfile:
    """The datasheet-based H100 SXM profile (configs/hardware/h100_sxm.yaml)."""
    return load_profile(DEFAULT_PROFILE)


# The shipped profiles by the GPU name that selects them (torch.cuda.get_device_name()).
SHIPPED_BY_GPU = {"H200": HARDWARE_DIR / "h200_sxm.yaml", "H100": HARDWARE_DIR / "h100_sxm.yaml"}


def shipped_profile_for(device_name: str) -> HardwareProfile | None:
    """The shipped profile of a GPU named ``device_name`` (e.g. 'NVIDIA H100 80GB HBM3'); None
    for any other device (calibrate one with ``moectl plan calibrate``)."""
    for model, path in SHIPPED_BY_GPU.items():
        if model in device_name:
            return load_profile(path)
    return None


_POSITIVE = ("gpus_per_node", "memory_gib", "peak_flops", "memory_bandwidth")
_NON_NEGATIVE = ("op_latency_s", "layer_host_s", "step_host_s", "collective_host_s")


def load_profile(path: str | Path) -> HardwareProfile:
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"hardware profile {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ProfileError(f"hardware profile {path}: expected a mapping of fields")
    return profile_from_dict(data, str(path))


def profile_from_dict(data: dict, where: str = "hardware profile") -> HardwareProfile:
    known = {f.name for f in fields(HardwareProfile)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ProfileError(f"{where}: unknown field {unknown[0]!r}; allowed: {sorted(known)}")
    for name in known - {"sources"}:
        if data.get(name) is None:
            raise ProfileError(
                f"{where}: field {name!r} is missing (a profile written by an older "
                "`moectl plan calibrate`? calibrate again)"
            )
    for name in _POSITIVE:
        _number(data, name, where, positive=True)
    for name in _NON_NEGATIVE:
        _number(data, name, where, positive=False)
    if data["attention"] not in ATTENTION_KERNELS:
        raise ProfileError(
            f"{where}: attention={data['attention']!r}; allowed: {list(ATTENTION_KERNELS)}"
        )
    if not isinstance(data["host_overlaps_device"], bool):
        raise ProfileError(f"{where}: host_overlaps_device must be true or false")
    return HardwareProfile(
        name=str(data["name"]),
        gpus_per_node=int(data["gpus_per_node"]),
        memory_gib=float(data["memory_gib"]),
        peak_flops=float(data["peak_flops"]),
        gemm=_rate_table(data, "gemm", where),
        grouped_gemm=_rate_table(data, "grouped_gemm", where),
        memory_bandwidth=float(data["memory_bandwidth"]),
        op_latency_s=float(data["op_latency_s"]),
        layer_host_s=float(data["layer_host_s"]),
        step_host_s=float(data["step_host_s"]),
        collective_host_s=float(data["collective_host_s"]),
        host_overlaps_device=data["host_overlaps_device"],
        attention=data["attention"],
        intra_node=_links(data, "intra_node", where),
        inter_node=_links(data, "inter_node", where),
        sources=tuple(str(s) for s in data.get("sources") or ()),
    )


def _number(data: dict, name: str, where: str, positive: bool) -> float:
    value = data[name]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        allowed = "a number > 0" if positive else "a number >= 0"
        raise ProfileError(f"{where}: {name}={value!r}; allowed: {allowed}")
    return float(value)


def _rate_table(data: dict, name: str, where: str) -> tuple[tuple[float, float], ...]:
    rows = data[name]
    if not isinstance(rows, list) or not rows:
        raise ProfileError(f"{where}: {name} must be a non-empty list of [FLOPs, FLOP/s] pairs")
    table = []
    for i, row in enumerate(rows):
        if not (isinstance(row, (list, tuple)) and len(row) == 2):
            raise ProfileError(f"{where}: {name}[{i}]={row!r}; allowed: a [FLOPs, FLOP/s] pair")
        pair = {f"{name}[{i}][0]": row[0], f"{name}[{i}][1]": row[1]}
        for key in pair:
            _number(pair, key, where, positive=True)
        table.append((float(row[0]), float(row[1])))
    if any(b[0] <= a[0] for a, b in zip(table, table[1:])):
        raise ProfileError(f"{where}: {name} FLOPs must be strictly ascending")
    return tuple(table)


def _links(data: dict, name: str, where: str) -> dict[str, Link]:
    section = data[name]
    if not isinstance(section, dict):
        raise ProfileError(f"{where}: {name} must map {list(COLLECTIVES)} to links")
    links = {}
    for collective in COLLECTIVES:
        entry = section.get(collective)
        if not isinstance(entry, dict):
            raise ProfileError(f"{where}: field '{name}.{collective}' is missing")
        for key in ("latency_s", "bus_bandwidth"):
            if entry.get(key) is None:
                raise ProfileError(f"{where}: field '{name}.{collective}.{key}' is missing")
        _number(
            {f"{name}.{collective}.latency_s": entry["latency_s"]},
            f"{name}.{collective}.latency_s",
            where,
            positive=False,
        )
        _number(
            {f"{name}.{collective}.bus_bandwidth": entry["bus_bandwidth"]},
            f"{name}.{collective}.bus_bandwidth",
            where,
            positive=True,
        )
        links[collective] = Link(float(entry["latency_s"]), float(entry["bus_bandwidth"]))
    return links
