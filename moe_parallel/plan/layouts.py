"""Layout search for N GPUs, and the memory check ``moectl train`` / ``submit`` run before a launch.

The search enumerates (TP, PP, EP, DP, ETP, micro-batch size, recompute) with TP x PP x DP = N
(CP = 1, sequence parallelism on whenever TP > 1). Each candidate is validated by the config's own
rules (``Layout.apply`` rebuilds the RunConfig, so config/rules.py gives the reason: world size,
experts % EP, heads % TP, layers % PP, MoE with TP > 1 needs SP, global batch % (micro x DP), ...),
then by the hardware profile's node (a TP group must fit in one node) and by memory (the worst
pipeline stage above ``gpu_memory_gib``). Those that fit are sorted by the step time of the per-op
model (plan/estimate.py) on the hardware profile (plan/hardware.py).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from ..config import RunConfig
from ..model.param_names import Trainable
from .estimate import Overlap, StepTime, estimate_step_time
from .hardware import HardwareProfile, default_profile
from .memory import GiB, Layout, MemoryEstimate, estimate_memory

DEFAULT_GPU_MEMORY_GIB = 80.0  # H100 / A100 80GB
RECOMPUTE = ("none", "selective", "full")
MICRO_BATCHES = (1, 2, 4, 8)


@dataclass
class Candidate:
    layout: Layout
    memory: MemoryEstimate
    time: StepTime

    def as_dict(self) -> dict:
        return {"layout": self.layout.describe(), **self.memory.as_dict(), **self.time.as_dict()}


@dataclass
class SearchResult:
    gpus: int
    gpu_memory_gib: float
    fitting: list[Candidate]
    rejected: Counter = field(default_factory=Counter)  # reason -> count
    examples: dict = field(default_factory=dict)  # reason -> one rejected layout

    def as_dict(self, top: int) -> dict:
        return {
            "gpus": self.gpus,
            "gpu_memory_gib": self.gpu_memory_gib,
            "fitting": len(self.fitting),
            "best": [c.as_dict() for c in self.fitting[:top]],
            "rejected": [
                {"reason": r, "count": n, "example": self.examples[r]}
                for r, n in self.rejected.most_common()
            ],
        }


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(cfg: RunConfig, gpus: int) -> list[Layout]:
    tensors = [t for t in (1, 2, 4, 8) if gpus % t == 0]
    experts = _divisors(cfg.model.moe.num_experts) if cfg.model.moe else [1]
    out = []
    for t in tensors:
        for p in _divisors(gpus // t):
            dp = gpus // (t * p)
            for ep in experts:
                for etp in sorted({1, t}):
                    for mbs in MICRO_BATCHES:
                        for rc in RECOMPUTE:
                            out.append(
                                Layout(
                                    tensor=t,
                                    pipeline=p,
                                    expert=ep,
                                    data=dp,
                                    expert_tensor=etp if etp != t else None,
                                    micro_batch_size=mbs,
                                    recompute=rc,
                                    distributed_optimizer=cfg.parallel.distributed_optimizer,
                                    sequence_parallel=t > 1,
                                    precision=cfg.train.precision,
                                    trainable=Trainable.of(cfg),
                                )
                            )
    return out


def reason_class(message: str) -> str:
    """A rule's message without its numbers, so that rejections can be counted by kind."""
    head = message.split(";")[0]
    return re.sub(r"\d+(\.\d+)?", "N", head).strip()


def search_layouts(
    cfg: RunConfig,
    gpus: int,
    gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB,
    vocab: int | None = None,
    hw: HardwareProfile | None = None,
    overlap: Overlap = Overlap(),
) -> SearchResult:
    hw = hw or default_profile()
    result = SearchResult(gpus, gpu_memory_gib, [])
    limit = gpu_memory_gib * GiB
    checked: dict[Layout, RunConfig | str] = {}
    for layout in candidate_layouts(cfg, gpus):
        key = layout
        if key not in checked:
            try:
                checked[key] = layout.apply(cfg)
            except ValueError as exc:
                checked[key] = _first_error(exc)
        layout_cfg = checked[key]
        if isinstance(layout_cfg, str):
            _reject(result, layout_cfg, layout)
            continue
        if layout.tensor > hw.gpus_per_node:
            _reject(result, node_message(layout, hw), layout)
            continue
        memory = estimate_memory(layout_cfg, layout, vocab)
        if memory.peak_bytes > limit:
            _reject(
                result,
                f"memory: worst stage needs more than --gpu-memory {gpu_memory_gib:g} GiB",
                layout,
                f"{memory.peak_bytes / GiB:.1f} GiB",
            )
            continue
        padded = vocab or padded_vocab(cfg, layout)
        result.fitting.append(
            Candidate(layout, memory, estimate_step_time(cfg, layout, padded, hw, overlap))
        )
    result.fitting.sort(key=lambda c: (c.time.total_s, c.memory.peak_bytes))
    return result


def node_message(layout: Layout, hw: HardwareProfile) -> str:
    return (
        f"parallel.tensor={layout.tensor} does not fit in one node of the hardware profile "
        f"{hw.name!r} (gpus_per_node={hw.gpus_per_node}): a TP group must stay inside a node"
    )


def padded_vocab(cfg: RunConfig, layout: Layout) -> int:
    import math

    multiple = math.lcm(128, layout.tensor)
    return -(-cfg.model.vocab_size // multiple) * multiple


def _first_error(exc: ValueError) -> str:
    """pydantic wraps the rule's ValueError: keep the rule's own message."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        msgs = [e.get("msg", "") for e in errors()]
        if msgs:
            return msgs[0].removeprefix("Value error, ")
    return str(exc)


def _reject(result: SearchResult, message: str, layout: Layout, detail: str = "") -> None:
    kind = reason_class(message)
    result.rejected[kind] += 1
    if kind not in result.examples:
        result.examples[kind] = (
            f"{layout.describe()} mbs={layout.micro_batch_size} "
            f"recompute={layout.recompute}: {detail or message}"
        )


# ---------------------------------------------------------------- the check before a launch


class DoesNotFit(ValueError):
    """The planner says the run's layout cannot fit in the target GPU memory."""


def check_fits(
    cfg: RunConfig, gpu_memory_gib: float | None, force: bool = False, vocab: int | None = None
) -> MemoryEstimate | None:
    """Refuse a layout whose worst stage needs more than ``gpu_memory_gib`` (None: no target,
    e.g. CPU ranks: nothing is checked). ``force`` lets it through. Returns the estimate."""
    if gpu_memory_gib is None or force:
        return None
    if cfg.model.vocab_size is None and vocab is None:
        vocab = _tokenizer_vocab(cfg)
    memory = estimate_memory(cfg, vocab=vocab)
    if memory.peak_bytes > gpu_memory_gib * GiB:
        w = memory.worst
        raise DoesNotFit(
            f"the layout {Layout.of(cfg).describe()} (micro-batch {cfg.train.micro_batch_size}) "
            f"needs about {w.total / GiB:.1f} GiB on pipeline stage {w.pp_rank} (weights "
            f"{w.weights / GiB:.1f}, gradients {w.grads / GiB:.1f}, optimizer "
            f"{w.optimizer / GiB:.1f}, activations {w.activations / GiB:.1f}, transient "
            f"{w.transient / GiB:.1f}, overhead {w.total / GiB - w.static / GiB - w.activations / GiB - w.transient / GiB:.1f}) "
            f"but the GPUs have {gpu_memory_gib:g} GiB; see `moectl plan CONFIG --gpus "
            f"{cfg.world_size} --gpu-memory {gpu_memory_gib:g}` for layouts that fit, or pass "
            "--force to launch anyway"
        )
    return memory


def _tokenizer_vocab(cfg: RunConfig) -> int:
    """The vocabulary of the run's tokenizer, padded to 128 x TP (prepares the data if needed)."""
    from ..data import prepare
    from ..model.vocab import padded_vocab_size

    return padded_vocab_size(prepare(cfg.data).vocab_size, cfg.parallel.tensor)


def target_memory_gib(
    flag: float | None, ranks_have_gpus: bool, device_memory_gib: float | None = None
) -> float | None:
    """The memory a launch is checked against: ``--gpu-memory`` when given; else, for GPU ranks,
    this machine's GPU memory (``moectl train`` on a GPU node) or DEFAULT_GPU_MEMORY_GIB (a
    submit to GPU nodes); None (no check) for CPU ranks."""
    if flag is not None:
        return flag
    if not ranks_have_gpus:
        return None
    return device_memory_gib if device_memory_gib is not None else DEFAULT_GPU_MEMORY_GIB


def local_memory_check(gpu_memory_flag: float | None, force: bool):
    """``moectl train``'s check (run by plan_train before the run directory is created): the
    ranks have GPUs when this machine has one and the config does not ask for CPU."""

    def check(cfg: RunConfig) -> None:
        import torch

        gpus = torch.cuda.is_available() and cfg.train.device != "cpu"
        device_gib = torch.cuda.get_device_properties(0).total_memory / GiB if gpus else None
        check_fits(cfg, target_memory_gib(gpu_memory_flag, gpus, device_gib), force)

    return check


def submit_memory_check(
    cfg: RunConfig, ranks_have_gpus: bool | None, gpu_memory_flag: float | None, force: bool
) -> None:
    """``moectl submit``'s check, before anything is created or queued: the ranks have GPUs when
    the cluster profile gives them some (``Backend.ranks_have_gpus``: slurm.gpus_per_node,
    ray.gpus_per_rank) and the config does not ask for CPU."""
    gpus = bool(ranks_have_gpus) and cfg.train.device != "cpu"
    check_fits(cfg, target_memory_gib(gpu_memory_flag, gpus), force)
