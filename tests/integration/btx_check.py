"""A rank program for the BTX mix test (world size 1): compares the mixed MoE checkpoint with the
branch checkpoints and writes the largest differences to RUN_DIR/check.json.

    python tests/integration/btx_check.py RUN_DIR      (RUN_DIR/mix.json as for the mix)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moe_parallel.runtime.bootstrap import prepare_process, start_rank, stop_rank  # noqa: E402


def main(run_dir: Path) -> None:
    from moe_parallel.ckpt.checkpoint import load_checkpoint
    from moe_parallel.config import load_config
    from moe_parallel.data import prepare
    from moe_parallel.model.build import build_train_objects
    from moe_parallel.train.one_rank import ONE_RANK, WEIGHTS_ONLY

    spec = json.loads((run_dir / "mix.json").read_text())
    dense = load_config(spec["dense_config"], [*ONE_RANK, *WEIGHTS_ONLY])
    moe = load_config(spec["moe_config"], ONE_RANK)
    start_rank(moe, "cpu")
    vocab = prepare(moe.data).vocab_size
    branches = []
    for path in spec["experts"]:
        objs = build_train_objects(dense, vocab, on_cpu=True)
        load_checkpoint(Path(path), objs, dense)
        branches.append(objs.model[0].module)
    mixed = build_train_objects(moe, vocab, on_cpu=True)
    load_checkpoint(Path(spec["out"]) / "step_00000000", mixed, moe)
    model = mixed.model[0].module
    params = dict(model.named_parameters())
    dense_params = [dict(b.named_parameters()) for b in branches]
    expert_diff, mean_diff, n_expert, n_mean = 0.0, 0.0, 0, 0
    for name, value in params.items():
        if ".mlp.router." in name:
            continue
        if ".local_experts." in name:
            head, rest = name.split(".experts.local_experts.")
            i, tail = rest.split(".", 1)
            source = dense_params[int(i)][f"{head}.{tail}"]
            expert_diff = max(expert_diff, (value - source).abs().max().item())
            n_expert += 1
        else:  # the branches' mean, or the one model named by non_expert_from
            source = spec.get("non_expert_from")
            if source:
                mean = dense_params[spec["experts"].index(source)][name].float()
            else:
                mean = torch.stack([d[name].float() for d in dense_params]).mean(0)
            mean_diff = max(mean_diff, (value - mean).abs().max().item())
            n_mean += 1
    forced = {}
    torch.manual_seed(0)
    x = torch.randn(8, 2, moe.model.hidden_size)
    experts = moe.model.moe.num_experts
    with torch.no_grad():
        for layer in range(moe.model.num_layers):
            for i in range(experts):
                moe_mlp = model.decoder.layers[layer].mlp
                tokens = x.shape[0] * x.shape[1]

                def one_hot(inp, padding_mask=None, *, expert=i):  # Megatron passes the mask
                    probs = torch.zeros(tokens, experts)
                    probs[:, expert] = 1.0
                    return probs, probs.bool()

                moe_mlp.router.forward = one_hot
                got, _ = moe_mlp(x)
                want, _ = branches[i].decoder.layers[layer].mlp(x)
                forced[f"{layer}.{i}"] = (got - want).abs().max().item() / want.abs().max().item()
    result = {
        "expert_max_diff": expert_diff,
        "mean_max_diff": mean_diff,
        "experts_checked": n_expert,
        "means_checked": n_mean,
        "forced_router_max_rel_diff": max(forced.values()),
        "forced": forced,
        "forced_cases": len(forced),
        "output_scale": x.abs().max().item(),
        "router_std": torch.cat([v.reshape(-1) for k, v in params.items() if ".mlp.router." in k])
        .std()
        .item(),
    }
    (run_dir / "check.json").write_text(json.dumps(result, indent=1))
    stop_rank()


if __name__ == "__main__":
    prepare_process("cpu")
    main(Path(sys.argv[1]))
