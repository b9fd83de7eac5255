"""Model FLOPs utilisation: achieved training FLOP/s over the GPUs' peak.

MFU = tokens/s x training FLOPs per token (the planner's figure, from ``run_info.json``) /
(ranks x peak FLOP/s of one GPU). Peaks are NVIDIA's dense (no sparsity) tensor-core figures:
BF16/FP16 for bf16 and fp16 runs, TF32 for fp32 runs. CPU runs have no MFU ('-'); a GPU missing
from the table has none unless the peak is given (``--peak-tflops`` or
``$MOE_PARALLEL_PEAK_TFLOPS``), and the view says why ('?').
"""

from __future__ import annotations

import os

PEAK_ENV = "MOE_PARALLEL_PEAK_TFLOPS"

# name fragment (matched in the CUDA device name, longest first) -> (BF16/FP16, TF32) TFLOP/s
PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "GB200": (2500.0, 1250.0),
    "B200": (2250.0, 1100.0),
    "H200": (989.0, 494.0),
    "GH200": (989.0, 494.0),
    "H100 NVL": (835.0, 418.0),
    "H100 PCIe": (756.0, 378.0),
    "H100": (989.0, 494.0),
    "H800": (989.0, 494.0),
    "A100": (312.0, 156.0),
    "A800": (312.0, 156.0),
    "L40S": (362.0, 183.0),
    "A10G": (70.0, 35.0),
}


def peak_flops(gpu: str, precision: str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one GPU for the run's precision, or None for a GPU not in the table."""
    if override_tflops is None and os.environ.get(PEAK_ENV):
        override_tflops = float(os.environ[PEAK_ENV])
    if override_tflops is not None:
        return override_tflops * 1e12
    for fragment in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if fragment in gpu:
            bf16, tf32 = PEAK_TFLOPS[fragment]
            return (tf32 if precision == "fp32" else bf16) * 1e12
    return None


def mfu(
    tokens_per_s: float | None, info: dict | None, override_tflops: float | None = None
) -> tuple[float | None, str]:
    """(MFU as a fraction, or None; the text to show): '-' on CPU or before the run started,
    '?' for a GPU whose peak is unknown, else e.g. '41.2%'."""
    if info is None or tokens_per_s is None or info.get("device") != "cuda":
        return None, "-"
    peak = peak_flops(info.get("gpu") or "", info["precision"], override_tflops)
    if peak is None:
        return None, "?"
    value = tokens_per_s * info["train_flops_per_token"] / (info["ranks"] * peak)
    return value, f"{100 * value:.1f}%"


def unknown_gpu_note(info: dict | None) -> str | None:
    """Why MFU shows '?': the GPU and how to give its peak."""
    if info is None or info.get("device") != "cuda":
        return None
    if peak_flops(info.get("gpu") or "", info["precision"]) is not None:
        return None
    return (
        f"no peak FLOP/s known for GPU {info.get('gpu')!r}: give it with --peak-tflops or "
        f"${PEAK_ENV} (known: {', '.join(PEAK_TFLOPS)})"
    )
