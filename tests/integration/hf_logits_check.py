"""A rank program for the Hugging Face conversion tests: our model's fp32 logits on given tokens,
under any layout, from a converted checkpoint loaded the way ``checkpoint.init_from`` loads it,
and the loss of those tokens through the training path (Megatron's schedule, its
vocab-parallel cross entropy, the step's loss reduction).

    python tests/integration/hf_logits_check.py RUN_DIR

``RUN_DIR/logits.json``: {"config": run config YAML, "checkpoint": step directory,
"tokens": [[ids]], "labels": [[next ids]], "overrides": [layout overrides]}. Every rank feeds the
same tokens and writes ``RUN_DIR/logits_rank{R}.pt`` (B x S x padded vocab; tensor-parallel
shards gathered) and ``RUN_DIR/loss_rank{R}.json`` (mean loss of ``labels`` over the batch).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moe_parallel.runtime.bootstrap import prepare_process, start_rank, stop_rank  # noqa: E402


def main(run_dir: Path) -> None:
    from megatron.core import parallel_state

    from moe_parallel.ckpt.checkpoint import load_weights
    from moe_parallel.config import load_config
    from moe_parallel.model.build import build_train_objects
    from moe_parallel.train.step import evaluate_loss

    spec = json.loads((run_dir / "logits.json").read_text())
    cfg = load_config(
        spec["config"], [*spec["overrides"], "train.device=cpu", "train.precision=fp32"]
    )
    info = start_rank(cfg, "cpu")
    objs = build_train_objects(cfg, cfg.model.vocab_size, on_cpu=True)
    load_weights(Path(spec["checkpoint"]), objs, cfg)
    model = objs.model[0].module
    model.eval()
    tokens = torch.tensor(spec["tokens"], dtype=torch.long)
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        logits = model(tokens, positions, None)
    if cfg.parallel.tensor > 1:  # vocabulary-parallel output: gather the shards
        group = parallel_state.get_tensor_model_parallel_group()
        parts = [torch.empty_like(logits) for _ in range(cfg.parallel.tensor)]
        torch.distributed.all_gather(parts, logits.contiguous(), group=group)
        logits = torch.cat(parts, dim=-1)
    torch.save(logits.float(), run_dir / f"logits_rank{info.rank}.pt")
    # Every data-parallel rank feeds the whole batch as its one micro-batch: the global mean is
    # the batch's mean.
    batch = {
        "tokens": tokens,
        "labels": torch.tensor(spec["labels"], dtype=torch.long),
        "loss_mask": torch.ones(tokens.shape, dtype=torch.float32),
        "position_ids": positions,
    }
    loss = evaluate_loss(objs, [iter([batch])], 1, tokens.shape[1], tokens.shape[0])
    (run_dir / f"loss_rank{info.rank}.json").write_text(json.dumps({"loss": loss}))
    stop_rank()


if __name__ == "__main__":
    prepare_process("cpu")
    main(Path(sys.argv[1]))
