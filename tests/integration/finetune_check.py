"""A rank program for the Flan-MoE finetune test (world size 1): the loss of packed instruction
batches counts response tokens only. Writes RUN_DIR/check.json.

    python tests/integration/finetune_check.py RUN_DIR      (RUN_DIR/config.yaml: one rank)

It takes a real micro-batch of the run's packed training data, computes the loss exactly as
the training step does (``train/step.py``: the model's per-token losses, ``loss_sum``) and the
gradients of every parameter, in training mode (expert dropout on, keyed by the samples), then:
changes every prompt position's label (loss_mask 0) -> the loss and every gradient must be
bit-identical; changes one response label -> the loss and the gradients must change.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moe_parallel.runtime.bootstrap import prepare_process, start_rank, stop_rank  # noqa: E402


def main(run_dir: Path) -> None:
    from moe_parallel.ckpt.manager import resume_training
    from moe_parallel.config import load_config
    from moe_parallel.data import prepare
    from moe_parallel.data.packing import finetune_datasets
    from moe_parallel.model.build import build_train_objects
    from moe_parallel.model.routers import noise
    from moe_parallel.train.step import loss_sum

    cfg = load_config(run_dir / "config.yaml")
    start_rank(cfg, "cpu")
    prepared = prepare(cfg.data)
    objs = build_train_objects(cfg, prepared.vocab_size, on_cpu=True)
    resume_training(cfg, run_dir, objs, print)  # the pretrained weights (checkpoint.init_from)
    model = objs.model[0].module
    model.train()
    train, _ = finetune_datasets(cfg, prepared.tokenizer_path, 4, 0)
    samples = [train[i] for i in range(4)]
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}

    def loss_and_grads(labels):
        objs.model[0].zero_grad_buffer()  # DDP accumulates gradients into main_grad
        with noise.samples(torch.arange(4)):  # expert dropout keyed by these sample ids
            losses = model(
                batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=labels
            )
        loss, _, _ = loss_sum(batch["loss_mask"], losses)
        loss.backward()
        grads = {n: p.main_grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.item(), grads

    base_loss, base_grads = loss_and_grads(batch["labels"])
    prompt = batch["loss_mask"] == 0
    vocab = prepared.vocab_size
    other = batch["labels"].clone()
    other[prompt] = (other[prompt] + 7) % vocab
    prompt_loss, prompt_grads = loss_and_grads(other)
    response = batch["labels"].clone()
    r = torch.nonzero(batch["loss_mask"][0])[0].item()
    response[0, r] = (response[0, r] + 7) % vocab
    resp_loss, resp_grads = loss_and_grads(response)

    model.eval()  # no expert dropout
    with torch.no_grad():
        losses = model(
            batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"]
        )
        eval_loss = loss_sum(batch["loss_mask"], losses)[0].item()

    def max_diff(a, b):
        return max((a[n] - b[n]).abs().max().item() for n in a)

    result = {
        "loss": base_loss,
        "prompt_changed_loss": prompt_loss,
        "response_changed_loss": resp_loss,
        "eval_loss": eval_loss,
        "prompt_labels_changed": int((other != batch["labels"]).sum()),
        "prompt_grad_max_diff": max_diff(base_grads, prompt_grads),
        "prompt_grads_identical": all(
            torch.equal(base_grads[n], prompt_grads[n]) for n in base_grads
        ),
        "response_grad_max_diff": max_diff(base_grads, resp_grads),
        "num_grads": len(base_grads),
        "frozen": sorted(n for n, p in model.named_parameters() if not p.requires_grad),
        "loss_positions": int(batch["loss_mask"].sum()),
        "positions": batch["loss_mask"].numel(),
    }
    (run_dir / "check.json").write_text(json.dumps(result, indent=1))
    stop_rank()


if __name__ == "__main__":
    prepare_process("cpu")
    main(Path(sys.argv[1]))
