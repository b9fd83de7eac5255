"""A one-process program for test_moe_deployment: a Megatron MoE layer run plainly, through
expert buffering at several budgets, and under a permuted placement; writes RESULT.json with
exact-equality flags, the buffer's counts and the per-batch active experts (for the test's own
simulation of the policy).

    python tests/unit/deployment_layer_check.py RESULT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moe_parallel.runtime.bootstrap import machine_device, prepare_process  # noqa: E402

BUDGETS = [1, 2, 3, 5, 8]


def main(out: Path) -> None:
    from moe_parallel.serve.buffering import buffer_moe_layer
    from moe_parallel.serve.placement import permute_moe_layer, permute_state_dict
    from moe_parallel.serve.standalone import build_moe_layer, start_one_rank

    start_one_rank()
    layer = build_moe_layer(experts=8, top_k=2)
    g = torch.Generator().manual_seed(1)
    # Batches of different sizes, the small ones activating few experts.
    batches = [torch.randn(s, 1, 16, generator=g) for s in (6, 1, 9, 2, 4, 12, 1, 3)]
    with torch.no_grad():
        plain = [layer(x)[0] for x in batches]
        active = []
        for x in batches:
            _, routing_map = layer.router(x.reshape(-1, 16))
            active.append(sorted(int(e) for e in routing_map.any(0).nonzero().flatten()))

    def twin_of(source):  # deepcopy cannot copy process groups: build and load the weights
        twin = build_moe_layer(experts=8, top_k=2, seed=123)
        twin.load_state_dict(source.state_dict())
        return twin

    result = {"active": active, "budgets": {}, "expert_bytes": None}
    for budget in BUDGETS:
        twin = twin_of(layer)
        buffered = buffer_moe_layer(twin, budget)
        with torch.no_grad():
            got = [twin(x)[0] for x in batches]
        result["budgets"][str(budget)] = {
            "equal": all(torch.equal(a, b) for a, b in zip(got, plain)),
            "arena_slots": int(next(iter(buffered.buffer.arena.values())).shape[0]),
            **buffered.buffer.stats.as_dict(),
        }
        result["expert_bytes"] = buffered.buffer.expert_bytes
        # The slots hold the resident experts' weights, and the computation reads them there:
        # corrupting a resident expert's slot changes the output of a batch that uses it.
        buf = buffered.buffer
        result["budgets"][str(budget)]["slots_hold_weights"] = all(
            torch.equal(buf.arena[n][slot], buf.host[e][n])
            for e, slot in buf.policy.slot_of.items()
            for n in buf.arena
        )
        last = batches[-3]  # batch 5 uses every expert
        resident = next(iter(buf.policy.slot_of.items()))
        buf.arena["linear_fc2.weight"][resident[1]].mul_(2.0)
        with torch.no_grad():
            changed = not torch.equal(twin(last)[0], plain[5]) if budget == 8 else None
        result["budgets"][str(budget)]["reads_from_slot"] = changed
    # A placement (reverse + swap) applied to the layer, and to its state dict.
    perm = [7, 2, 5, 0, 1, 6, 3, 4]
    placed = twin_of(layer)
    permute_moe_layer(placed, perm)
    from_state = twin_of(layer)
    from_state.load_state_dict(permute_state_dict(layer.state_dict(), {0: perm}, prefix=""))
    with torch.no_grad():
        moved = [placed(x)[0] for x in batches]
        loaded = [from_state(x)[0] for x in batches]
        buffered_placed = twin_of(placed)
        buffer_moe_layer(buffered_placed, 3)
        both = [buffered_placed(x)[0] for x in batches]
    result["placement_equal"] = all(torch.equal(a, b) for a, b in zip(moved, plain))
    result["placement_max_diff"] = max(float((a - b).abs().max()) for a, b in zip(moved, plain))
    result["state_dict_equal"] = all(torch.equal(a, b) for a, b in zip(loaded, moved))
    result["buffered_placed_equal"] = all(torch.equal(a, b) for a, b in zip(both, plain))
    result["weights_moved"] = not torch.equal(
        placed.experts.local_experts[0].linear_fc1.weight,
        layer.experts.local_experts[0].linear_fc1.weight,
    )
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    prepare_process(machine_device())
    main(Path(sys.argv[1]))
