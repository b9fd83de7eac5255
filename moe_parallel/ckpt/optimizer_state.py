"""Optimizer state in model space: reshardable to any layout, whatever the optimizer's shape.

Megatron's own optimizer formats follow the optimizer's internal structure (distributed-
optimizer buckets, chained dense/expert optimizers, param groups), so they cannot follow a model
to another layout: at EP=1 the expert parameters join the dense optimizer, under a new DP size
the buckets are cut differently. Here every Adam state of a parameter (fp32 main weight,
exp_avg, exp_avg_sq) is saved as a tensor of that *parameter's* shape, under the parameter's own
global checkpoint key and sharding (``optimizer.<state>.<param key>``). Loading maps each loaded
tensor back to whatever optimizer owns the parameter in the new layout: a plain Adam state, or
this rank's slice of a distributed-optimizer shard. The Adam step count is one number.

The distributed optimizer keeps each parameter's state split over its data-parallel group, as
a contiguous range of the flattened parameter on each rank. Each rank saves its own range as
boxes of the parameter's global tensor (``flat_range_boxes``): no collective and no copy before
the save, and the stored tensors are the same as those of a plain optimizer.
"""

from __future__ import annotations

import math
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
    steps = {
        int(st["step"])
        for sub in getattr(optimizer, "chained_optimizers", [optimizer])
        for st in sub.optimizer.state.values()
        if "step" in st
    }
    if len(steps) > 1:
        raise RuntimeError(f"optimizer parameters disagree on the Adam step count: {sorted(steps)}")
    return steps.pop() if steps else 0


# ------------------------------------------------------------------------------------- saving
def saving_states(model_sharded: dict, all_slots: list[Slot]) -> dict:
    """The optimizer state to save, as ShardedTensors under the parameters' own global keys.

    Plain optimizers hold each parameter's whole state: one ShardedTensor per state with the
    parameter's sharding (replicas across data parallel are deduplicated by their replica id).
    A distributed optimizer holds a slice of each flattened parameter on each data-parallel rank:
    every rank saves its own slice as boxes of the parameter (``_owned_boxes``), so a save needs
    no collective and no copy before the fork. The stored tensor is the same as if one rank had
    saved it whole; only its chunks differ, and loading reads any chunking.
    """
    by_param = _model_entries(model_sharded)
    out = {}
    for i, slot in enumerate(all_slots):
        model_sh = _model_entry(by_param, slot)
        if not slot.distributed:
            state = _plain_state(slot)
            for name in STATES:
                out[f"{i}.{name}"] = make_sharded_optimizer_tensor(
                    model_sh, state[name], f"optimizer.{name}"
                )
            continue
        owned = _owned_range(slot.optimizer, slot.model_param)
        if owned is None:
            continue  # other data-parallel ranks hold this parameter's state
        flat = _owned_state(slot, owned)
        for name in STATES:
            for j, box in enumerate(
                _owned_boxes(model_sh, owned, flat[name], f"optimizer.{name}", slot.optimizer)
            ):
                out[f"{i}.{name}.{j}"] = box
    return out


def _plain_state(slot: Slot) -> dict[str, torch.Tensor]:
    state = slot.optimizer.optimizer.state.get(slot.main_param, {})
    zeros = lambda: torch.zeros_like(slot.main_param, dtype=torch.float32)  # noqa: E731
    return {
        "param": slot.main_param.detach().float(),
        "exp_avg": state.get("exp_avg", zeros()).float(),
        "exp_avg_sq": state.get("exp_avg_sq", zeros()).float(),
    }


def _owned_state(slot: Slot, owned: tuple[int, int]) -> dict[str, torch.Tensor]:
    """This rank's flat slices (1-D, fp32) of the parameter's main weight and moments; before
    the first step Adam has no moments yet and they are saved as zeros."""
    opt = slot.optimizer
    tensors = opt._get_main_param_and_optimizer_states(slot.model_param)
    size = owned[1] - owned[0]
    zeros = lambda: torch.zeros(size, dtype=torch.float32, device=slot.model_param.device)  # noqa: E731
    return {
        name: tensors[name].detach().float().view(-1) if name in tensors else zeros()
        for name in STATES
    }


def _owned_boxes(
    model_sh, owned: tuple[int, int], flat: torch.Tensor, prefix: str, opt
) -> list[ShardedTensor]:
    """The slice ``owned`` (a range of the flattened local parameter) of one state as
    ShardedTensors of the global tensor: for each stored piece of the parameter (one, or the
    pieces a factory such as SwiGLU's w/v split makes), the part of the slice inside it, cut
    into axis-aligned boxes. Data are views of ``flat``; nothing is copied."""
    out = []
    for piece, piece_start in _stored_pieces(model_sh):
        shape = tuple(piece.local_shape)
        start = max(owned[0], piece_start)
        end = min(owned[1], piece_start + math.prod(shape))
        if start >= end:
            continue
        lead = piece.prepend_axis_num
        replica = _main_replica_in_data_parallel(piece.replica_id, opt)
        for offset, size, flat_start in flat_range_boxes(
            shape, start - piece_start, end - piece_start
        ):
            first = piece_start + flat_start - owned[0]
            data = flat[first : first + math.prod(size)].view((1,) * lead + size)
            global_offset = (
                *piece.global_offset[:lead],
                *(g + o for g, o in zip(piece.global_offset[lead:], offset)),
            )
            # Prepended axes are folded into the box's own shape: Megatron's uneven-sharding
            # path (axis_fragmentations=None) takes local_shape as the chunk's full size.
            out.append(
                ShardedTensor(
                    f"{prefix}.{piece.key}",
                    data,
                    torch.float32,
                    local_shape=(1,) * lead + size,
                    global_shape=tuple(piece.global_shape),
                    global_offset=global_offset,
                    axis_fragmentations=None,
                    replica_id=replica,
                    prepend_axis_num=0,
                )
            )
    return out


def _stored_pieces(model_sh) -> list[tuple[ShardedTensor, int]]:
    """(piece, its first element in the flattened local parameter) for each ShardedTensor the
    parameter is stored as. A factory is built on a meta tensor to learn its pieces' sharding;
    each piece must be a contiguous part of the local tensor (SwiGLU's chunk along dim 0 is)."""
    if isinstance(model_sh, ShardedTensor):
        return [(model_sh, 0)]
    probe = torch.empty(model_sh.data.shape, dtype=torch.float32, device="meta")
    built = model_sh.build_fn(model_sh.key, probe, model_sh.replica_id, None)
    pieces = built if isinstance(built, (list, tuple)) else [built]
    out = []
    for piece in pieces:
        if not isinstance(piece, ShardedTensor) or not piece.data.is_contiguous():
            raise RuntimeError(
                f"the checkpoint factory of {model_sh.key} makes a piece this "
                "optimizer-state save cannot slice (not a contiguous tensor)"
            )
        out.append((piece, piece.data.storage_offset()))
    return out


def _main_replica_in_data_parallel(replica_id, opt) -> tuple | int:
    """The piece's replica id with its data-parallel component set to 0: each data-parallel
    rank's slice is unique, while replicas along the other axes (a norm weight on every TP rank)
    stay replicas. Megatron puts the data-parallel rank last; checked, not assumed."""
    dp_rank = torch.distributed.get_rank(opt.data_parallel_group)
    if isinstance(replica_id, int):
        replica_id = (replica_id,)
    if replica_id[-1] != dp_rank:
        raise RuntimeError(
            f"replica id {replica_id} does not end with this rank's data-parallel "
            f"rank {dp_rank}: the optimizer slice's replica cannot be derived"
        )
    return (*replica_id[:-1], 0)


def flat_range_boxes(shape: tuple[int, ...], start: int, end: int):
    """Cut the elements ``start..end`` of a row-major tensor of ``shape`` into axis-aligned boxes:
    yields (offset, size, first flat index) in flat order, at most 2*ndim-1 boxes."""
    if start >= end:
        return
    if len(shape) <= 1:
        yield (start,), (end - start,), start
        return
    inner = math.prod(shape[1:])
    first_row, last_row = start // inner, (end - 1) // inner
    if first_row == last_row:
        base = first_row * inner
        for off, size, flat in flat_range_boxes(shape[1:], start - base, end - base):
            yield (first_row, *off), (1, *size), base + flat
        return
    row = first_row
    if start % inner:  # a partial first row
        base = first_row * inner
        for off, size, flat in flat_range_boxes(shape[1:], start - base, inner):
            yield (first_row, *off), (1, *size), base + flat
        row += 1
    full_end = end // inner
    if full_end > row:
        yield (row, *(0,) * (len(shape) - 1)), (full_end - row, *shape[1:]), row * inner
    if end % inner:  # a partial last row
        base = full_end * inner
        for off, size, flat in flat_range_boxes(shape[1:], 0, end - base):
            yield (full_end, *off), (1, *size), base + flat


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


def loading_states(model_sharded: dict, all_slots: list[Slot]) -> dict:
    """``{"<slot index>.<state>": ShardedTensor}``: empty tensors of each parameter's local
    shape, under the parameter's own key and sharding, for a checkpoint to load into."""
    by_param = _model_entries(model_sharded)
    out = {}
    for i, slot in enumerate(all_slots):
        model_sh = _model_entry(by_param, slot)
        for name in STATES:
            empty = torch.empty(
                slot.model_param.shape, dtype=torch.float32, device=slot.model_param.device
            )
            out[f"{i}.{name}"] = make_sharded_optimizer_tensor(model_sh, empty, f"optimizer.{name}")
    return out


def _model_entries(model_sharded: dict) -> dict:
    return {id(t.data): t for t in _sharded_leaves(model_sharded)}


def _model_entry(by_param: dict, slot: Slot):
    model_sh = by_param.get(id(slot.model_param))
    if model_sh is None:
        raise RuntimeError(
            f"an optimizer parameter of shape {tuple(slot.model_param.shape)} has no entry in "
            "the model's sharded state dict, so its optimizer state could not be saved or loaded"
        )
    return model_sh


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
