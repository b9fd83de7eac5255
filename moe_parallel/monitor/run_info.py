"""What a run is, as its views need it: ``RUN_DIR/run_info.json``, written by rank 0 when
training starts (again at every restart, which may change the layout or the machines).

    {"time": 1718000000.0, "step": 0, "device": "cuda", "gpu": "NVIDIA H100 80GB HBM3",
     "ranks": 16, "precision": "bf16", "vocab_size": 32768, "train_flops_per_token": 1.2e9}

``train_flops_per_token`` is the planner's figure (moe_parallel/plan/params.py ``describe``) for
the model with the run's real (padded) vocabulary; the views turn tokens/s into MFU with it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

RUN_INFO_FILE = "run_info.json"


def run_info(cfg, vocab_size: int, device: str, world_size: int, step: int) -> dict:
    from ..plan.params import describe

    model = cfg.model.model_copy(update={"vocab_size": vocab_size})
    flops = describe(cfg.model_copy(update={"model": model}))["train_flops_per_token"]
    gpu = None
    if device == "cuda":
        import torch

        gpu = torch.cuda.get_device_name()
    return {
        "time": time.time(),
        "step": step,
        "device": device,
        "gpu": gpu,
        "ranks": world_size,
        "precision": cfg.train.precision,
        "vocab_size": vocab_size,
        "train_flops_per_token": flops,
    }


def write_run_info(run_dir: Path | str, info: dict) -> None:
    path = Path(run_dir) / RUN_INFO_FILE
    tmp = path.with_name(f".{RUN_INFO_FILE}.tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


def read_run_info(run_dir: Path | str) -> dict | None:
    """None before the run's first start (or for runs older than this file)."""
    path = Path(run_dir) / RUN_INFO_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:  # written atomically: a bad file is a real problem
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
