"""Step metrics: one JSON line per logged step (metrics.jsonl), TensorBoard and optionally
Weights & Biases, rank 0 only."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsWriter:
    """``wandb``: the run config when ``log.wandb`` is on (monitor/wandb_sink.py), else None."""

    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool, wandb=None):
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        self.file = None
        if not enabled:
            return
        self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if wandb is not None:
            from ..monitor.wandb_sink import WandbSink

            self.wandb = WandbSink(wandb, run_dir)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        if self.tb is None and self.wandb is None:
            return
        values = scalars(record)
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(record["step"], values)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.close()


def scalars(record: dict) -> dict[str, float]:
    """The record's finite numbers by name; per-layer values as ``moe/imbalance/layer_3``."""
    out = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = value
        elif isinstance(value, dict):
            for sub, v in value.items():
                if isinstance(v, (int, float)):
                    out[f"{key}/layer_{sub}"] = v
    return out


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
