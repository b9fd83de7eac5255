"""``moectl finetune``: ``moectl train`` for a config with a ``finetune`` section, that starts from
a pretrained checkpoint (``checkpoint.init_from``, weights only). ``init_from`` may name a run
directory or its ``checkpoints`` directory: it is resolved here to the newest checkpoint, so the
run's config records the exact step it started from. The same config runs unchanged through
``moectl train`` and ``moectl submit`` (SLURM, Ray): it is the same training entry."""

from __future__ import annotations

from pathlib import Path

from ..config import load_config


def finetune_overrides(config_path: str, overrides: list[str]) -> list[str]:
    cfg = load_config(config_path, overrides)
    if cfg.finetune is None:
        raise ValueError(
            f"{config_path} has no finetune section: `moectl finetune` trains on "
            "instruction data (see configs/tiny/flan_moe_tiny.yaml); use "
            "`moectl train` for pretraining"
        )
    if cfg.checkpoint.init_from is None:
        raise ValueError(
            "checkpoint.init_from is not set: a finetune starts from a pretrained "
            "checkpoint, e.g. checkpoint.init_from=runs/moe-tiny-.../"
        )
    from ..ckpt.checkpoint import resolve_checkpoint

    start = Path(cfg.checkpoint.init_from)
    if not start.is_dir():
        raise FileNotFoundError(f"checkpoint.init_from={start} is not a directory")
    start = resolve_checkpoint(start).resolve()
    return [*overrides, f"checkpoint.init_from={start}"]
