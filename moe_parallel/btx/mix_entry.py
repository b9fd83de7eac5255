"""``python -m moe_parallel.btx.mix_entry RUN_DIR``: one rank mixes BTX branches into an MoE.

``RUN_DIR/mix.json`` names the dense config, the MoE config and the expert checkpoints (in
expert order). The rank loads each branch (any layout it was trained with) into a 1-rank dense
model, builds the 1-rank MoE model, sets its parameters with :func:`moe_parallel.btx.mix.mix`
(routers keep their fresh initialisation) and saves it as a step-0 checkpoint with a fresh
optimizer. Being a regular checkpoint, the finetune can load it under any layout (expert
parallel included) through ``checkpoint.init_from``.
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


def branch_state(cfg, vocab: int, path: Path, on_cpu: bool) -> dict[str, torch.Tensor]:
    objs = load_model(cfg, vocab, path, on_cpu)
    return {k: v.detach().clone() for k, v in parameters(objs).items()}


def run_mix(run_dir: Path) -> Path:
    from moe_parallel.model.build import build_train_objects

    from .mix import mix

    job = start_dense_to_moe(run_dir / "mix.json")
    spec, dense, moe, vocab, on_cpu = job.spec, job.dense, job.moe, job.vocab, job.on_cpu
    branches = []
    for i, path in enumerate(spec["experts"]):
        print(f"loading expert {i} from {path}", flush=True)
        branches.append(branch_state(dense, vocab, Path(path), on_cpu))
    objs = build_train_objects(moe, vocab, on_cpu=on_cpu)
    target = parameters(objs)
    non_expert = None
    if spec.get("non_expert_from"):
        print(f"non-expert parameters from {spec['non_expert_from']}", flush=True)
        non_expert = branch_state(dense, vocab, Path(spec["non_expert_from"]), on_cpu)
    mixed = mix(branches, target, non_expert)
    with torch.no_grad():
        for name, value in mixed.items():
            target[name].copy_(value)
        std = spec.get("router_init_std")
        if std is not None:  # the routers were drawn from N(0, init_method_std): rescale them
            for name in set(target) - set(mixed):
                target[name].mul_(std / moe.model.init_method_std)
    out = save_verified(Path(spec["out"]), objs, moe, vocab, on_cpu, mixed, "BTX mix")
    report = {
        "checkpoint": str(out),
        "experts": spec["experts"],
        "mixed": len(mixed),
        "experts_per_layer": moe.model.moe.num_experts,
        "routers_kept": sorted(set(target) - set(mixed)),
    }
    (run_dir / "mix_report.json").write_text(json.dumps(report, indent=1))
    print(f"mixed {len(branches)} branches into {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    return one_rank_main(run_mix, "python -m moe_parallel.btx.mix_entry RUN_DIR", argv)


if __name__ == "__main__":
    sys.exit(main())
