"""``moectl doctor``: check this machine in one command, part by part.

On a GPU node (one GPU): versions; BF16 training steps of a Mixtral-shaped stack (hidden 4096,
expert width 14336, 8 experts top-2, as many layers as the planner says fit) with MFU and the
planner's predicted step time; the step clock (CUDA events); Transformer Engine's layer spec
against the local spec on the same weights; FP8 (hybrid, delayed and current scaling) against
BF16; an async checkpoint save on the GPU and its load on CPU ranks. Without a GPU the parts that
can run do, at the tiny config's shapes on CPU ranks, and the others say they need a GPU.

Each part prints ``<part>: <status> figure=value ...``; then ``doctor_s=`` (the whole check's
seconds; goal on one GPU: under 480) and, last, ``doctor_failed=<n>``
and the exit code is 1 when a part that ran failed. Every run is a job of the local backend
(``doctor_rank.py`` on its ranks), its logs in its own run directory.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moe_parallel.train.one_rank import ONE_RANK

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs/tiny/moe_tiny.yaml"
MIXTRAL = REPO / "configs/models/mixtral_8x7b.yaml"
TE_TOLERANCE = 0.02  # ||TE - local|| / ||local|| of the logits: BF16 rounding over a few layers
CLOCK_RANGE = (0.8, 1.1)  # the step clock's span over the host-timed step
MEMORY_HEADROOM = 0.85  # share of the GPU's memory the planner's estimate may fill
STEPS = 6  # training steps per step job (the first is not timed)

# What every step job sets: a short run on one rank, monitored (the step clock), nothing saved.
STEP_JOB = [
    *ONE_RANK,
    f"train.steps={STEPS}",
    "train.warmup_steps=1",
    "monitor.enabled=true",
    "checkpoint.save_at_end=false",
    "log.tensorboard=false",
]
# The Mixtral-shaped stack on one GPU: Mixtral 8x7B's widths, the built-in data (a stand-in
# tokenizer; the embedding keeps Mixtral's 32000 rows), one micro-batch of 4096 tokens.
MIXTRAL_ON_ONE_GPU = [
    "train.global_batch_size=1",
    "train.micro_batch_size=1",
    "train.fp8=null",
    "data.prefixes=null",
    "data.tokenizer=null",
    "data.max_bytes=4000000",
]


@dataclass
class Part:
    name: str
    status: str  # "passed", "failed", "needs a GPU" or "needs Transformer Engine"
    figures: dict = field(default_factory=dict)
    detail: str = ""

    def line(self) -> str:
        figures = " ".join(f"{k}={_text(v)}" for k, v in self.figures.items())
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.name}: {self.status}{' ' + figures if figures else ''}{detail}"


def _text(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace(" ", "_")


@dataclass
class JobResult:
    run_dir: Path
    exit_code: int
    figures: dict | None  # None: the job failed before writing them

    def failure(self, name: str) -> Part:
        return Part(
            name, "failed", detail=f"rank job exited {self.exit_code}; logs in {self.run_dir}"
        )


def run_doctor(runs_root: str | None = None, layers: int | None = None) -> int:
    """Run every part, print one line each and ``doctor_failed=<n>``; 1 if a part failed."""
    from moe_parallel.runtime.bootstrap import machine_device

    started = time.perf_counter()
    device = machine_device()
    has_te = device == "cuda" and importlib.util.find_spec("transformer_engine") is not None
    parts = [versions(device)]
    _say(parts[-1])
    config, overrides = step_config(device, has_te, layers)
    bf16 = run_job("step", device, config, overrides, runs_root)
    for part in (training_step(bf16), step_clock(bf16)):
        parts.append(_say(part))
    if not has_te:
        needs = "needs a GPU" if device == "cpu" else "needs Transformer Engine"
        parts += [_say(Part("te_spec", needs)), _say(Part("fp8", needs))]
    else:
        parts.append(_say(te_spec(config, overrides, runs_root)))
        parts.append(_say(fp8(bf16, config, overrides, runs_root)))
    for part in checkpoint_parts(device, runs_root):
        parts.append(_say(part))
    failed = sum(p.status == "failed" for p in parts)
    print(f"doctor_s={time.perf_counter() - started:.0f}")
    print(f"doctor_failed={failed}", flush=True)
    return 1 if failed else 0


def _say(part: Part) -> Part:
    print(part.line(), flush=True)
    return part


def versions(device: str) -> Part:
    """torch, CUDA, NCCL, Megatron-core, Transformer Engine, Apex ("absent" where not
    importable). Transformer Engine and Apex are imported only on a GPU machine."""
    figures = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "absent",
        "nccl": "absent",
        "megatron_core": importlib.metadata.version("megatron-core"),
    }
    if device == "cuda" and torch.distributed.is_nccl_available():
        nccl = torch.cuda.nccl.version()  # a tuple in recent torch, an int in older ones
        figures["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    for name, module in (("transformer_engine", "transformer_engine"), ("apex", "apex")):
        figures[name] = _optional_version(module, device)
    ok = device == "cpu" or figures["nccl"] != "absent"
    return Part("versions", "passed" if ok else "failed", figures, "" if ok else "no NCCL")


def _optional_version(module: str, device: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "absent"
    if device == "cpu":  # installed, left unimported: its import wants CUDA
        return "installed_not_imported_on_CPU"
    try:
        imported = importlib.import_module(module)
    except ImportError as exc:
        return f"absent (import failed: {exc})"
    return str(getattr(imported, "__version__", "unknown"))


def step_config(device: str, has_te: bool, layers: int | None) -> tuple[Path, list[str]]:
    """The step jobs' config and overrides: the tiny config on CPU; on a GPU the Mixtral-shaped
    stack with ``layers`` layers (None: as many as the planner says fit in its memory)."""
    if device == "cpu":
        return TINY, [*STEP_JOB, "train.device=cpu"]
    overrides = [
        *STEP_JOB,
        *MIXTRAL_ON_ONE_GPU,
        "train.device=cuda",
        f"model.moe.grouped_gemm={str(has_te).lower()}",  # grouped GEMM: TE's kernels
    ]
    if layers is None:
        layers = layers_that_fit(
            MIXTRAL, overrides, torch.cuda.get_device_properties(0).total_memory
        )
    return MIXTRAL, [*overrides, f"model.num_layers={layers}"]


def layers_that_fit(config: Path, overrides: list[str], gpu_bytes: int) -> int:
    """The most layers whose planner memory estimate fits in MEMORY_HEADROOM of ``gpu_bytes``."""
    from moe_parallel.config import load_config
    from moe_parallel.plan.memory import estimate_memory

    fits, most = 0, load_config(config, overrides).model.num_layers
    while fits < most:
        cfg = load_config(config, [*overrides, f"model.num_layers={fits + 1}"])
        if estimate_memory(cfg).peak_bytes > MEMORY_HEADROOM * gpu_bytes:
            break
        fits += 1
    if fits == 0:
        raise ValueError(f"not one layer of {config.name} fits in {gpu_bytes / 2**30:.0f} GiB")
    return fits


def run_job(
    job: str,
    device: str,
    config: Path,
    overrides: list[str],
    runs_root: str | None,
    *args: str,
    threads_per_rank: int | None = None,
    name: str | None = None,
) -> JobResult:
    """One doctor_rank job on local ranks, in its own run directory (``doctor-<name or job>-...``);
    its figures. ``threads_per_rank``: None lets the backend share the cores among the ranks."""
    from cluster import RunSpec, run_local
    from moe_parallel.config import load_config
    from moe_parallel.launch_run import prepare_run
    from moe_parallel.runtime.bootstrap import local_rank_preload

    cfg = load_config(config, [*overrides, f"name=doctor-{name or job}"])
    launch = prepare_run(cfg, None, runs_root, nproc=None, gpus=device == "cuda")
    entry = [sys.executable, "-m", "moe_parallel.bench.doctor_rank", job, device]
    spec = RunSpec(
        launch.run_dir,
        cfg.world_size,
        [*entry, str(launch.run_dir), *args],
        threads_per_rank=threads_per_rank,
        preload=local_rank_preload(device),
    )
    code = run_local(spec, stream=False)
    result = launch.run_dir / "doctor.json"
    figures = json.loads(result.read_text()) if code == 0 and result.is_file() else None
    return JobResult(launch.run_dir, code, figures)


def training_step(job: JobResult) -> Part:
    if job.figures is None:
        return job.failure("training_step")
    f = job.figures
    figures = {
        "device": "cuda" if f["max_memory_gib"] is not None else "cpu",
        "layers": f["layers"],
        "loss": f["loss"],
        "step_s": f["step_s"],
        "tokens_per_s": f["tokens_per_s"],
        "mfu": f["mfu"],
        "peak_tflops": f["peak_flops"] / 1e12,
        "peak_from": f["peak_from"],
    }
    if f["planner_step_s"] is None:  # said, not hidden: no shipped profile for this device
        figures["planner"] = "needs_a_calibrated_profile(moectl_plan_calibrate)"
    else:
        figures["planner_profile"] = f["planner_profile"].replace(" ", "_")
        figures["planner_step_s"] = f["planner_step_s"]
        figures["planner_over_measured"] = f["planner_step_s"] / f["step_s"]
    if f["max_memory_gib"] is not None:
        figures["max_memory_gib"] = f["max_memory_gib"]
    ok = f["losses_finite"]
    return Part(
        "training_step", "passed" if ok else "failed", figures, "" if ok else "a loss is not finite"
    )


def step_clock(job: JobResult) -> Part:
    if job.figures is None:
        return job.failure("step_clock")
    ratio = job.figures["clock_over_step"]
    ok = ratio is not None and CLOCK_RANGE[0] <= ratio <= CLOCK_RANGE[1]
    figures = {"clock": job.figures["clock"], "clock_over_step": ratio}
    detail = "" if ok else f"expected within {CLOCK_RANGE[0]}-{CLOCK_RANGE[1]}"
    return Part("step_clock", "passed" if ok else "failed", figures, detail)


def te_spec(config: Path, overrides: list[str], runs_root: str | None) -> Part:
    """Same weights, same tokens, forward only, two layers; grouped GEMM off on both sides (the
    local spec's grouped GEMM is another package's kernels)."""
    extra = ["model.moe.grouped_gemm=false", "model.num_layers=2"]
    job = run_job("te", "cuda", config, [*overrides, *extra], runs_root)
    if job.figures is None:
        return job.failure("te_spec")
    diff = job.figures["relative_difference"]
    ok = diff <= TE_TOLERANCE
    figures = {**job.figures, "tolerance": TE_TOLERANCE}
    return Part("te_spec", "passed" if ok else "failed", figures)


def fp8(bf16: JobResult, config: Path, overrides: list[str], runs_root: str | None) -> Part:
    """``train.fp8: hybrid`` with delayed scaling and with current (tensorwise) scaling: step
    time against the BF16 step's."""
    figures, failed = {}, []
    for recipe in ("delayed", "tensorwise"):
        extra = ["train.fp8=hybrid", f"train.fp8_recipe={recipe}"]
        job = run_job("step", "cuda", config, [*overrides, *extra], runs_root, name=f"fp8-{recipe}")
        if job.figures is None or not job.figures["losses_finite"]:
            failed.append(
                f"{recipe}: {job.failure('fp8').detail if job.figures is None else 'loss not finite'}"
            )
            continue
        figures[f"{recipe}_step_s"] = job.figures["step_s"]
        if bf16.figures is not None:
            figures[f"{recipe}_speedup_over_bf16"] = bf16.figures["step_s"] / job.figures["step_s"]
    return Part("fp8", "failed" if failed else "passed", figures, "; ".join(failed))


def checkpoint_parts(device: str, runs_root: str | None) -> list[Part]:
    """An async save of a BF16 run on this machine's device (one rank), then its load on two CPU
    ranks (expert-parallel 2: the checkpoint reshards), weights compared tensor by tensor."""
    common = ["train.precision=bf16", "log.tensorboard=false", "monitor.enabled=false"]
    save_overrides = [
        *ONE_RANK,
        *common,
        "train.steps=2",
        "train.warmup_steps=1",
        "checkpoint.async_save=true",
        "checkpoint.save_at_end=false",
        f"train.device={device}",
    ]
    # One intra-op thread: the async save forks its writer, and a fork taken after OpenMP's
    # threads ran hangs the child's first parallel op (seen: the writer's clone on one CPU rank
    # with 2 threads, checkpoint.async_save on CPU ranks has the same exposure).
    save = run_job("save", device, TINY, save_overrides, runs_root, threads_per_rank=1)
    parts = [] if device == "cuda" else [Part("checkpoint_save_gpu", "needs a GPU")]
    if save.figures is None or save.figures["checkpoint"] is None:
        return [*parts, save.failure(f"checkpoint_save_{device}")]
    parts.append(
        Part(
            f"checkpoint_save_{device}",
            "passed",
            {k: v for k, v in save.figures.items() if k != "checkpoint"},
        )
    )
    load_overrides = [*common, "train.steps=2", "train.warmup_steps=1", "train.device=cpu"]
    load = run_job("load", "cpu", TINY, load_overrides, runs_root, save.figures["checkpoint"])
    if load.figures is None:
        return [*parts, load.failure("checkpoint_load_cpu")]
    f = load.figures
    ok = f["compared"] > 0 and f["differ"] == 0 and f["missing"] == 0
    detail = "" if ok else f"tensors differ or are missing (rank 0's: {f['examples']})"
    figures = {k: v for k, v in f.items() if k != "examples"}
    return [*parts, Part("checkpoint_load_cpu", "passed" if ok else "failed", figures, detail)]
