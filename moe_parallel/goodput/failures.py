"""Failure rates per component, per GPU-hour, from Llama 3's interruption table; a YAML overrides.

Source: Dubey et al. 2024, "The Llama 3 Herd of Models" (arXiv 2407.21783), section 3.3.4 and
Table 5: 466 job interruptions in a 54-day snapshot of pre-training on 16,384 H100 GPUs, 47
planned (automated maintenance) and 419 unexpected, by root cause:

    Faulty GPU 148, GPU HBM3 memory 72, software bug 54, network switch/cable 35,
    host maintenance (unplanned) 32, GPU SRAM memory 19, GPU system processor 17, NIC 7,
    NCCL watchdog timeouts 7, silent data corruption 6, GPU thermal interface + sensor 6,
    SSD 3, power supply 3, server chassis 2, IO expansion board 2, dependency 2, CPU 2,
    system memory 2.

Grouped here into the components a recovery treats differently. ``hang``: the failure stops
progress without killing a process, so only the hang watchdog (``monitor.hang_timeout``) sees it;
otherwise a process dies and the backend sees it within a heartbeat. ``replace``: a node leaves
the job and a replacement (or an elastic shrink) is needed. ``planned``: the job is told ahead,
saves and stops (SIGUSR2 path), so no work is lost. Rates are per GPU-hour: a cluster of N GPUs
fails N times as often (Llama 3 reports no dependence on size beyond that).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import yaml

# Dubey et al. 2024, Table 5 and section 3.3.4: the snapshot's size and length.
LLAMA3_GPUS = 16_384
LLAMA3_DAYS = 54
LLAMA3_GPU_HOURS = LLAMA3_GPUS * LLAMA3_DAYS * 24


@dataclass(frozen=True)
class Component:
    name: str
    rate_per_gpu_hour: float
    hang: bool = False  # seen by the hang watchdog only
    replace: bool = False  # takes a node out of the job
    planned: bool = False  # announced: save, stop, restart
    source: str = ""


def _llama3(name: str, count: int, what: str, **kind) -> Component:
    return Component(
        name, count / LLAMA3_GPU_HOURS, source=f"Llama 3 Table 5: {what} = {count}", **kind
    )


# Dubey et al. 2024, Table 5 (counts in 54 days on 16,384 GPUs), grouped by recovery path.
LLAMA3_COMPONENTS = (
    _llama3(
        "gpu",
        148 + 19 + 17 + 6 + 6,
        "faulty GPU 148 + SRAM 19 + system processor 17 + SDC 6 + thermal 6",
        replace=True,
    ),
    _llama3("hbm", 72, "GPU HBM3 memory 72", replace=True),
    _llama3(
        "host",
        32 + 3 + 3 + 2 + 2 + 2 + 2,
        "host maintenance 32 + SSD 3 + power 3 + chassis 2 + IO board 2 + CPU 2 + memory 2",
        replace=True,
    ),
    _llama3("network", 35 + 7, "network switch/cable 35 + NIC 7", hang=True, replace=True),
    _llama3("software", 54 + 2, "software bug 54 + dependency 2"),
    _llama3("software_hang", 7, "NCCL watchdog timeouts 7", hang=True),
    _llama3("planned", 47, "planned interruptions 47 (of 466)", planned=True),
)
LLAMA3_UNEXPECTED = 419
LLAMA3_INTERRUPTIONS = 466


class FailureInputError(ValueError):
    """A failure model (rates YAML) that cannot be simulated."""


@dataclass(frozen=True)
class FailureModel:
    components: tuple[Component, ...]

    @property
    def rate_per_gpu_hour(self) -> float:
        return sum(c.rate_per_gpu_hour for c in self.components)

    def scaled(self, factor: float) -> "FailureModel":
        """Every rate times ``factor`` (e.g. 2: twice as many failures)."""
        return FailureModel(
            tuple(
                replace(c, rate_per_gpu_hour=c.rate_per_gpu_hour * factor) for c in self.components
            )
        )

    def to_dict(self) -> dict:
        return {
            c.name: {
                "rate_per_gpu_hour": c.rate_per_gpu_hour,
                "hang": c.hang,
                "replace": c.replace,
                "planned": c.planned,
                "source": c.source,
            }
            for c in self.components
        }


def check_rate(field: str, value: object) -> float:
    """A rate must be a positive number; the error names the field (to remove a component,
    leave it out of the YAML's ``components``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise FailureInputError(
            f"{field}={value!r}: a failure rate must be a number > 0 per GPU-hour "
            "(remove the component to leave it out)"
        )
    return float(value)


def load_failure_model(path: str | Path | None) -> FailureModel:
    """Llama 3's rates, with the YAML at ``path`` (if any) overriding them::

    components:            # replaces the whole set when `replace_all: true`
      gpu: {rate_per_gpu_hour: 1.0e-5}
      my_part: {rate_per_gpu_hour: 2.0e-6, hang: false, replace: true}
    replace_all: false
    """
    if path is None:
        return FailureModel(LLAMA3_COMPONENTS)
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict) or not isinstance(raw.get("components", {}), dict):
        raise FailureInputError(f"{path}: expected a mapping with a 'components' mapping")
    unknown = set(raw) - {"components", "replace_all"}
    if unknown:
        raise FailureInputError(
            f"{path}: unknown key(s) {sorted(unknown)}; allowed: components, replace_all"
        )
    base = {} if raw.get("replace_all") else {c.name: c for c in LLAMA3_COMPONENTS}
    for name, given in (raw.get("components") or {}).items():
        base[name] = _component(name, given or {}, base.get(name))
    if not base:
        raise FailureInputError(f"{path}: components is empty: give at least one failure rate")
    return FailureModel(tuple(base.values()))


def _component(name: str, given: dict, default: Component | None) -> Component:
    allowed = {"rate_per_gpu_hour", "hang", "replace", "planned"}
    if not isinstance(given, dict) or set(given) - allowed:
        raise FailureInputError(
            f"components.{name}: expected a mapping of {sorted(allowed)}, got {given!r}"
        )
    if "rate_per_gpu_hour" not in given and default is None:
        raise FailureInputError(f"components.{name}.rate_per_gpu_hour is missing")
    rate = given.get("rate_per_gpu_hour", default.rate_per_gpu_hour if default else None)
    base = default or Component(name, 0.0)
    return replace(
        base,
        rate_per_gpu_hour=check_rate(f"components.{name}.rate_per_gpu_hour", rate),
        hang=bool(given.get("hang", base.hang)),
        replace=bool(given.get("replace", base.replace)),
        planned=bool(given.get("planned", base.planned)),
        source="override" if "rate_per_gpu_hour" in given else base.source,
    )
