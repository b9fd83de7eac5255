"""Optimizer state in model space: reshardable to any layout, whatever the optimizer's shape.

Megatron's own optimizer formats follow the optimizer's internal structure (distributed-
optimizer buckets, chained dense/expert optimizers, param groups), so they cannot follow a model
to another layout: at EP=1 the expert parameters join the dense optimizer, under a new DP size
the buckets are cut differently. Here every Adam state of a parameter (fp32 main weight,
exp_avg, exp_avg_sq) is saved as a tensor of that *parameter's* shape, under the parameter's own
global checkpoint key and sharding (``optimizer.<state>.<param key>``). Loading maps each loaded
tensor back to whatever optimizer owns the parameter in the new layout: a plain Adam state, or
this rank's slice of a distributed-optimizer shard. The Adam step count is one number.

The distributed optimizer keeps each parameter's state split over its data-parallel group; one
all-reduce per optimizer assembles full per-parameter states on every rank of the group before a
save (memory: three fp32 copies of this rank's parameters, for the duration of the save).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

STATES = ("param", "exp_avg", "exp_avg_sq")


@dataclass
class Slot:
    """Where one model parameter's optimizer state lives on this rank."""

    model_param: torch.nn.Parameter
    optimizer: object  # the (sub-)optimizer that owns it
    main_param: torch.Tensor | None  # plain optimizers: the fp32 tensor Adam updates

    @property
    def distributed(self) -> bool:
        return isinstance(self.optimizer, DistributedOptimizer)


def slots(optimizer) -> list[Slot]:
    found = []
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(sub, DistributedOptimizer):
            # Every parameter of the group's buffers, in buffer order (the same on every DP
            # rank): the optimizer's own maps only list the parameters this rank owns a slice of.
            found += [Slot(p, sub, None) for buffer in sub.buffers for p in buffer.params]
        elif hasattr(sub, "float16_groups"):  # bf16/fp16 params with fp32 main copies
            for g16, g32 in zip(sub.float16_groups, sub.fp32_from_float16_groups):
                found += [Slot(p, sub, main) for p, main in zip(g16, g32)]
            found += [Slot(p, sub, p) for g in sub.fp32_from_fp32_groups for p in g]
        else:  # FP32Optimizer: Adam updates the model parameters themselves
            found += [Slot(p, sub, p) for g in sub.optimizer.param_groups for p in g["params"]]
    return found


def adam_step(optimizer) -> int:
    steps = {int(st["step"]) for sub in getattr(optimizer, "chained_optimizers", [optimizer])
             for st in sub.optimizer.state.values() if "step" in st}
    if len(steps) > 1:
        raise RuntimeError(f"optimizer parameters disagree on the Adam step count: {sorted(steps)}")
    return steps.pop() if steps else 0


# ------------------------------------------------------------------------------------- saving
def full_states(all_slots: list[Slot]) -> list[dict[str, torch.Tensor]]:
    """Per slot: fp32 tensors of the parameter's local shape for each of STATES."""
    out: list[dict | None] = [None] * len(all_slots)
    by_optimizer: dict[int, list[int]] = {}
    for i, slot in enumerate(all_slots):
        if slot.distributed:
            by_optimizer.setdefault(id(slot.optimizer), []).append(i)
        else:
            out[i] = _plain_state(slot)
    for indices in by_optimizer.values():
        for i, state in zip(indices, _gather_distributed([all_slots[i] for i in indices])):
            out[i] = state
    return out


def _plain_state(slot: Slot) -> dict[str, torch.Tensor]:
    state = slot.optimizer.optimizer.state.get(slot.main_param, {})
    zeros = lambda: torch.zeros_like(slot.main_param, dtype=torch.float32)  # noqa: E731
    return {"param": slot.main_param.detach().float(),
            "exp_avg": state.get("exp_avg", zeros()).float(),
            "exp_avg_sq": state.get("exp_avg_sq", zeros()).float()}


def _gather_distributed(group_slots: list[Slot]) -> list[dict[str, torch.Tensor]]:
    """Every DP rank of the optimizer holds a slice of each flattened parameter; fill the own
    slices into zeros and sum over the group: one all-reduce for all parameters."""
    opt = group_slots[0].optimizer
    if (torch.distributed.get_world_size(opt.data_parallel_group) == 1 and opt.optimizer.state
            and all(_owned_range(opt, s.model_param) == (0, s.model_param.numel())
                    for s in group_slots)):
        return [_whole_state(opt, slot) for slot in group_slots]  # nothing to assemble
    sizes = [s.model_param.numel() for s in group_slots]
    device = group_slots[0].model_param.device
    flat = torch.zeros(len(STATES), sum(sizes), dtype=torch.float32, device=device)
    offset = 0
    for slot, size in zip(group_slots, sizes):
        owned = _owned_range(opt, slot.model_param)
        if owned is not None and opt.optimizer.state:
            tensors = opt._get_main_param_and_optimizer_states(slot.model_param)
            for k, name in enumerate(STATES):
                if name in tensors:
                    flat[k, offset + owned[0]: offset + owned[1]] = tensors[name].float()
        offset += size
    torch.distributed.all_reduce(flat, group=opt.data_parallel_group)
    out, offset = [], 0
    for slot, size in zip(group_slots, sizes):
        shape = slot.model_param.shape
        out.append({name: flat[k, offset: offset + size].view(shape) for k, name in
                    enumerate(STATES)})
        offset += size
    return out


def _whole_state(opt: DistributedOptimizer, slot: Slot) -> dict[str, torch.Tensor]:
    """A data-parallel group of one owns every parameter whole: its own tensors (no copy; the
    save writes them before training changes them, or from the async writer's fork)."""
    shape = slot.model_param.shape
    zeros = lambda: torch.zeros(shape, dtype=torch.float32, device=slot.model_param.device)  # noqa: E731
    tensors = opt._get_main_param_and_optimizer_states(slot.model_param)
    return {name: tensors[name].detach().float().view(shape) if name in tensors else zeros()
            for name in STATES}


def _owned_range(opt: DistributedOptimizer, model_param) -> tuple[int, int] | None:
    where = opt.model_param_gbuf_map.get(model_param)
    if where is None:
        return None  # no slice of this parameter on this rank
    gbuf_index, dtype, bucket_index = where
    param_map = opt.gbuf_ranges[gbuf_index][dtype][bucket_index]["param_map"]
    if model_param not in param_map:
        return None
    r = param_map[model_param]["param"]
    return (r.start, r.end)


def sharded_states(model_sharded: dict, all_slots: list[Slot],
                   states: list[dict[str, torch.Tensor]]) -> dict:
    """``{"<slot index>.<state>": ShardedTensor}`` under the parameters' own keys and sharding."""
    by_param = {id(t.data): t for t in _sharded_leaves(model_sharded)}
    out = {}
    for i, (slot, state) in enumerate(zip(all_slots, states)):
        model_sh = by_param.get(id(slot.model_param))
        if model_sh is None:
            raise RuntimeError(
                f"an optimizer parameter of shape {tuple(slot.model_param.shape)} has no entry in "
                "the model's sharded state dict, so its optimizer state could not be saved"
            )
        for name in STATES:
            out[f"{i}.{name}"] = make_sharded_optimizer_tensor(model_sh, state[name],
                                                               f"optimizer.{name}")
    return out


def _sharded_leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _sharded_leaves(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _sharded_leaves(v)
    elif isinstance(tree, (ShardedTensor, ShardedTensorFactory)):
        yield tree


# ------------------------------------------------------------------------------------ loading
def empty_states(all_slots: list[Slot]) -> list[dict[str, torch.Tensor]]:
    return [{name: torch.empty(s.model_param.shape, dtype=torch.float32,
                               device=s.model_param.device) for name in STATES}
            for s in all_slots]


@torch.no_grad()
def restore(all_slots: list[Slot], loaded: dict, step: int) -> None:
    """Put loaded full per-parameter states into this layout's optimizers."""
    for i, slot in enumerate(all_slots):
        state = {name: loaded[f"{i}.{name}"] for name in STATES}
        if slot.distributed:
            _restore_distributed(slot, state, step)
        else:
            _restore_plain(slot, state, step)


def _restore_plain(slot: Slot, state: dict, step: int) -> None:
    slot.main_param.copy_(state["param"])
    target = slot.optimizer.optimizer.state[slot.main_param]
    for name in ("exp_avg", "exp_avg_sq"):
        if name in target:
            target[name].copy_(state[name])
        else:
            target[name] = state[name].to(slot.main_param.dtype).clone()
    target["step"] = torch.tensor(float(step))


def _restore_distributed(slot: Slot, state: dict, step: int) -> None:
    opt = slot.optimizer
    owned = _owned_range(opt, slot.model_param)
    if owned is None:
        return
    gi, go = opt.model_param_group_index_map[slot.model_param]
    main_shard = opt.optimizer.param_groups[gi]["params"][go]
    target = opt.optimizer.state[main_shard]
    start, end = owned
    main_shard.copy_(state["param"].reshape(-1)[start:end])
    for name in ("exp_avg", "exp_avg_sq"):
        piece = state[name].reshape(-1)[start:end]
        if name in target:
            target[name].copy_(piece)
        else:
            target[name] = piece.to(main_shard.dtype).clone()
    target["step"] = torch.tensor(float(step))


@torch.no_grad()
def reset_from_model(optimizer) -> None:
    """Fresh optimizer state for weights set from outside (a BTX mix, a conversion): main
    weights = the model's parameters, moments zero, step 0. Megatron's reload_model_params does
    not reach the distributed optimizer's fp32 main copies on CPU ranks (measured: they kept the
    initial weights), so the state is written the same way a checkpoint load writes it."""
    all_slots = slots(optimizer)
    loaded = {}
    for i, slot in enumerate(all_slots):
        loaded[f"{i}.param"] = slot.model_param.detach().float()
        loaded[f"{i}.exp_avg"] = torch.zeros_like(loaded[f"{i}.param"])
        loaded[f"{i}.exp_avg_sq"] = torch.zeros_like(loaded[f"{i}.param"])
    restore(all_slots, loaded, 0)
