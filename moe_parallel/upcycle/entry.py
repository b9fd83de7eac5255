"""``python -m moe_parallel.upcycle.entry OUT``: one rank upcycles a dense checkpoint.

``OUT/upcycle.json`` names the dense checkpoint, the dense config (from the checkpoint) and the
MoE config. The rank loads the dense checkpoint (any layout) into a 1-rank dense model, builds
the 1-rank MoE model, sets its parameters with :func:`moe_parallel.upcycle.weights.upcycle`
(routers, and PESC's adapter down projections, keep their fresh initialisation), and saves a
step-0 checkpoint with a fresh optimizer that loads under any layout through
``checkpoint.init_from``. It then checks its own work: the saved checkpoint, loaded back into a
fresh model, holds the upcycled values, and the MoE model's logits on a batch of random tokens
equal the dense model's (``OUT/upcycle_report.json``); a model that should equal the dense one
and does not is an error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from moe_parallel.train.one_rank import (
    load_model,
    parameters,
    save_verified,
    start_dense_to_moe,
)
from moe_parallel.train.one_rank import (
    main as one_rank_main,
)

# Logits of the upcycled model vs the dense one, relative to the largest logit: equal up to the
# order of float sums (fp32), or up to the rounding of bf16 activations.
LOGITS_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 5e-2}


def run_upcycle(out_dir: Path) -> Path:
    from moe_parallel.model.build import build_train_objects

    from .weights import upcycle

    job = start_dense_to_moe(out_dir / "upcycle.json")
    spec, dense_cfg, moe_cfg, vocab, on_cpu = job.spec, job.dense, job.moe, job.vocab, job.on_cpu
    print(f"loading the dense model from {spec['dense_checkpoint']}", flush=True)
    dense_objs = load_model(dense_cfg, vocab, Path(spec["dense_checkpoint"]), on_cpu)
    dense = {k: v.detach().clone() for k, v in parameters(dense_objs).items()}
    moe = moe_cfg.model.moe
    objs = build_train_objects(moe_cfg, vocab, on_cpu=on_cpu)
    target = parameters(objs)
    values = upcycle(dense, target, moe.num_experts, moe.expert_kind)
    fresh = sorted(set(target) - set(values))
    with torch.no_grad():
        for name, value in values.items():
            target[name].copy_(value)
        std = spec.get("router_init_std")
        if std is not None:  # routers were drawn from N(0, init_method_std): rescale them
            for name in fresh:
                if ".mlp.router." in name:
                    target[name].mul_(std / moe_cfg.model.init_method_std)
    saved = save_verified(Path(spec["out"]), objs, moe_cfg, vocab, on_cpu, values, "upcycle")
    diff = logits_difference(dense_objs, objs, vocab, moe_cfg.model.seq_length)
    report = {
        "checkpoint": str(saved),
        "dense_checkpoint": spec["dense_checkpoint"],
        "kind": moe.expert_kind,
        "experts": moe.num_experts,
        "top_k": moe.top_k,
        "copied": len(values),
        "fresh": fresh,
        "logits_max_abs_diff": diff["max_abs"],
        "logits_max_abs": diff["scale"],
        "equal_expected": spec["equal_expected"],
    }
    (out_dir / "upcycle_report.json").write_text(json.dumps(report, indent=1))
    tolerance = LOGITS_TOLERANCE[moe_cfg.train.precision] * max(1.0, diff["scale"])
    if spec["equal_expected"] and diff["max_abs"] > tolerance:
        raise RuntimeError(
            f"upcycle: the MoE model's logits differ from the dense model's by "
            f"{diff['max_abs']:.3g} (max |logit| {diff['scale']:.3g}); expected "
            "equal at initialisation"
        )
    print(
        f"upcycled into {saved}: logits differ from the dense model's by at most "
        f"{diff['max_abs']:.3g} (max |logit| {diff['scale']:.3g})",
        flush=True,
    )
    return saved


@torch.no_grad()
def logits_difference(
    dense_objs, moe_objs, vocab: int, seq_length: int, batch: int = 2, seed: int = 0
) -> dict:
    """Max |logits_moe - logits_dense| on ``batch`` sequences of random tokens (eval mode), over
    the ``vocab`` real ids (padded ids hold the mask value of model/padded_vocab.py, which is no
    logit scale)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq_length), generator=generator)
    positions = torch.arange(seq_length).unsqueeze(0).expand(batch, -1)
    outputs = []
    for objs in (dense_objs, moe_objs):
        model = objs.model[0].module
        model.eval()
        device = next(model.parameters()).device
        logits = model(tokens.to(device), positions.to(device), None)
        outputs.append(logits[..., :vocab].float().cpu())
        model.train()
    dense, moe = outputs
    return {"max_abs": (moe - dense).abs().max().item(), "scale": dense.abs().max().item()}


def main(argv: list[str] | None = None) -> int:
    return one_rank_main(run_upcycle, "python -m moe_parallel.upcycle.entry OUT", argv)


if __name__ == "__main__":
    sys.exit(main())
