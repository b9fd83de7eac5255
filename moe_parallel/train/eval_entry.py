"""``python -m moe_parallel.train.eval_entry RUN_DIR``: held-out losses of one checkpoint.

``RUN_DIR/eval.json``: ``models`` (a list of ``{name, config, checkpoint}``), ``tokenizer``,
``datasets`` (name -> list of prepared prefixes), ``split``, ``batches`` of
``global_batch_size`` sequences and ``seed``. Each checkpoint is
loaded into a 1-rank model (any layout it was saved with) and every dataset's validation split
is evaluated (see :mod:`moe_parallel.train.evaluate`), the same batches for every model. The
result goes to ``RUN_DIR/eval_report.json``: ``{"losses": {model: {dataset: loss}}}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from moe_parallel.train.one_rank import (
    WEIGHTS_ONLY,
    load_model,
    one_rank_config,
    start,
)
from moe_parallel.train.one_rank import (
    main as one_rank_main,
)

REPORT = "eval_report.json"


def run_eval(run_dir: Path) -> dict:
    from ..data.tokenizer import Tokenizer

    spec = json.loads((run_dir / "eval.json").read_text())
    vocab_size = Tokenizer.from_file(spec["tokenizer"]).vocab_size
    losses = {}
    for i, model in enumerate(spec["models"]):
        # The same batches for every model, whatever batch size each was trained with.
        cfg = one_rank_config(
            model["config"],
            [
                *WEIGHTS_ONLY,
                f"train.global_batch_size={spec['global_batch_size']}",
                f"train.micro_batch_size={spec['global_batch_size']}",
                f"data.split={spec['split']}",
            ],
        )
        if i == 0:
            on_cpu = start(cfg)
        losses[model["name"]] = _model_losses(
            spec, cfg, vocab_size, Path(model["checkpoint"]), on_cpu, model["name"]
        )
    report = {"losses": losses, "batches": spec["batches"]}
    (run_dir / REPORT).write_text(json.dumps(report, indent=1))
    return report


def _model_losses(
    spec: dict, cfg, vocab_size: int, checkpoint: Path, on_cpu: bool, name: str
) -> dict[str, float]:
    from ..data import PreparedData
    from .evaluate import HeldOutSet

    objs = load_model(cfg, cfg.model.vocab_size or vocab_size, checkpoint, on_cpu)
    device = torch.device("cpu") if on_cpu else torch.device("cuda", torch.cuda.current_device())
    losses = {}
    for dataset, prefixes in spec["datasets"].items():
        prepared = PreparedData(
            prefixes=list(prefixes),
            weights=None,
            tokenizer_path=spec["tokenizer"],
            vocab_size=vocab_size,
            num_tokens=0,
            num_documents=0,
        )
        losses[dataset] = HeldOutSet(cfg, prepared, spec["batches"], spec["seed"], device).loss(
            objs
        )
        print(f"{name}: held-out loss on {dataset} {losses[dataset]:.4f}", flush=True)
    return losses


def main(argv: list[str] | None = None) -> int:
    return one_rank_main(run_eval, "python -m moe_parallel.train.eval_entry RUN_DIR", argv)


if __name__ == "__main__":
    sys.exit(main())
