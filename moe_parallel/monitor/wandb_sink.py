"""Weights & Biases: the scalars of metrics.jsonl, logged next to TensorBoard (rank 0 only).

Asked for with ``log.wandb: true``; ``log.wandb_project``, ``log.wandb_name`` (default: the run
directory's name), ``log.wandb_mode`` (``online``, ``offline``: written under
``RUN_DIR/wandb`` without network, ``wandb sync`` uploads it later, or ``disabled``). The W&B run
id is the run directory's name, so the restarts of a run append to one W&B run; W&B drops steps
it has already seen, so steps retrained after a restart keep their first values there
(metrics.jsonl has both). Needs the optional ``wandb`` package (``pip install -e '.[wandb]'``);
the config refuses ``log.wandb: true`` without it.
"""

from __future__ import annotations

from pathlib import Path


class WandbSink:
    def __init__(self, cfg, run_dir: Path):
        import wandb

        log = cfg.log
        self.run = wandb.init(
            project=log.wandb_project,
            name=log.wandb_name or run_dir.name,
            mode=log.wandb_mode,
            dir=str(run_dir),
            id=run_dir.name,
            resume="allow",
            config=cfg.model_dump(mode="json"),
        )

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if scalars:
            self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()
