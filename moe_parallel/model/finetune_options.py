"""Flan-MoE's finetuning options on built model chunks: frozen routers or experts, expert dropout.

Applied by ``train/setup.py`` to the plain Megatron chunks, before data parallelism wraps them and
the optimizer is built, so frozen parameters (``requires_grad = False``) get no gradient buffer
and no optimizer state: Adam never touches them and the checkpoints hold them bit-identical.

Expert dropout (``finetune.expert_dropout = p``): in training, each routed expert's hidden
activation (the input of its second linear, width F) is multiplied by keep / (1 - p), keep ~
Bernoulli(1 - p) per (token, expert, column). The draws are hashes of the token's identity (its
global sample index and position, as the routing noise of ``model/routers/noise.py``), the layer,
the global expert index and the global column, so every layout (EP, DP, TP/ETP) and every resume
drops the same units. To know which token each permuted row inside an expert is, every MoE layer
sends the tokens' keys through its own token dispatcher first (a [T, 1] float64 tensor through
the same permutation and all-to-all as the hidden states: one extra small all-to-all per MoE
layer and micro-batch, in training only).

Shapes: S local sequence length, B micro-batch, T = S*B local tokens, N rows of an expert's
input, F expert hidden width (this rank's share under expert tensor parallelism).
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer

from moe_parallel.model.param_names import is_expert, is_router
from moe_parallel.model.routers import noise

_MASK32 = 0xFFFFFFFF
_DROPOUT_DRAW = 0x5EED_D0  # a constant apart from the routers' draw numbers


def apply_finetune_options(chunks, cfg) -> None:
    """Freeze and install expert dropout as ``cfg.finetune`` asks (nothing without it)."""
    ft = cfg.finetune
    if ft is None:
        return
    frozen = freeze(chunks, ft.freeze)
    if ft.freeze and not frozen:
        raise ValueError(f"finetune.freeze={ft.freeze} matched no parameter of the model")
    if ft.expert_dropout > 0:
        for chunk in chunks:
            for module in chunk.modules():
                if isinstance(module, MoELayer):
                    install_expert_dropout(module, ft.expert_dropout)


def freeze(chunks, parts: list[str]) -> list[str]:
    """Set requires_grad = False on the routers' and/or routed experts' parameters; their names."""
    tests = [{"router": is_router, "experts": is_expert}[p] for p in parts]
    names = []
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if any(test(name) for test in tests):
                param.requires_grad_(False)
                names.append(name)
    return names


def install_expert_dropout(layer: MoELayer, rate: float) -> None:
    experts = layer.experts
    layer._expert_dropout = {"rate": rate, "keys_N": None, "starts": None}
    original = layer.preprocess

    def preprocess(hidden_states, probs, routing_map):
        state = layer._expert_dropout
        state["keys_N"] = state["starts"] = None
        if layer.training:
            state["keys_N"], counts = _dispatched_keys(layer, hidden_states, probs, routing_map)
            state["starts"] = [0, *torch.tensor(counts).cumsum(0).tolist()]
        return original(hidden_states, probs, routing_map)

    layer.preprocess = preprocess
    if isinstance(experts, SequentialMLP):
        for i, expert in enumerate(experts.local_experts):
            expert.linear_fc2.register_forward_pre_hook(partial(_drop_one_expert, layer, i))
    elif hasattr(experts, "linear_fc2"):  # TEGroupedMLP: one grouped linear over all experts
        experts.linear_fc2.register_forward_pre_hook(partial(_drop_grouped, layer))
    else:
        raise ValueError(
            f"finetune.expert_dropout: experts of type {type(experts).__name__} "
            "have no second linear to hook (model.moe.grouped_gemm without "
            "Transformer Engine); use grouped_gemm=false"
        )


def _dispatched_keys(layer: MoELayer, hidden_SBH, probs_TE, routing_map_TE):
    """Each token's 32-bit key, permuted and dispatched like its hidden state: (keys_N, counts
    of rows per local expert)."""
    dispatcher = layer.token_dispatcher
    if getattr(dispatcher, "shared_experts", None) is not None:
        raise ValueError("finetune.expert_dropout does not support shared-expert overlap")
    S, B = hidden_SBH.shape[0], hidden_SBH.shape[1]
    sp = layer.config.sequence_parallel
    offset = parallel_state.get_tensor_model_parallel_rank() * S if sp else 0
    keys_SB1 = token_keys(layer.layer_number, offset, S, hidden_SBH.device)
    assert keys_SB1.shape[1] == B, (keys_SB1.shape, hidden_SBH.shape)
    with torch.no_grad():
        k, p = dispatcher.dispatch_preprocess(
            keys_SB1.to(torch.float64), routing_map_TE, probs_TE.detach()
        )
        k, p = dispatcher.token_dispatch(k, p)
        k, tokens_per_expert, _ = dispatcher.dispatch_postprocess(k, p)
    counts = [int(c) for c in torch.as_tensor(tokens_per_expert).tolist()]
    return k.reshape(-1).to(torch.int64), counts


def token_keys(
    layer_number: int, seq_offset: int, seq_len: int, device: torch.device
) -> torch.Tensor:
    """[S, B, 1] int64 keys < 2**32 of the micro-batch's tokens (sample, position, layer)."""
    ids_B = noise.current_samples().to(device)
    seed = noise.current_seed()
    h = _mix32(torch.tensor(seed & _MASK32, dtype=torch.int64, device=device))
    h = _mix32(h ^ ((seed >> 32) & _MASK32))
    h = _mix32(h ^ (layer_number & _MASK32))
    h = _mix32(h ^ _DROPOUT_DRAW)
    h_B = _mix32(_mix32(h ^ (ids_B & _MASK32)) ^ ((ids_B >> 32) & _MASK32))
    pos_S = torch.arange(seq_offset, seq_offset + seq_len, device=device, dtype=torch.int64)
    return _mix32(h_B.unsqueeze(0) ^ pos_S.unsqueeze(1)).unsqueeze(-1)


def keep_mask(
    keys_N: torch.Tensor, experts_N: torch.Tensor, width: int, col_offset: int, rate: float
) -> torch.Tensor:
    """[N, width] bool: which hidden units each row keeps (P(keep) = 1 - rate)."""
    h_N = _mix32(keys_N ^ (experts_N & _MASK32))
    cols = torch.arange(col_offset, col_offset + width, device=keys_N.device, dtype=torch.int64)
    u = (_mix32(h_N.unsqueeze(1) ^ cols.unsqueeze(0)).to(torch.float64) + 0.5) / float(1 << 32)
    return u >= rate


def _apply(layer: MoELayer, x_NF: torch.Tensor, rows: slice, experts_N: torch.Tensor):
    state = layer._expert_dropout
    keys = state["keys_N"][rows].to(x_NF.device)
    if keys.numel() != experts_N.numel():
        raise RuntimeError("expert dropout: dispatched keys and expert rows disagree")
    col_offset = parallel_state.get_expert_tensor_parallel_rank() * x_NF.shape[-1]
    keep = keep_mask(keys, experts_N.to(x_NF.device), x_NF.shape[-1], col_offset, state["rate"])
    n = keep.shape[0]
    scale = keep.to(x_NF.dtype) / (1.0 - state["rate"])
    if x_NF.shape[0] > n:  # FP8 padding rows (zeros) after the real ones
        scale = torch.cat([scale, scale.new_ones(x_NF.shape[0] - n, x_NF.shape[-1])])
    return x_NF * scale


def _drop_one_expert(layer: MoELayer, i: int, module, args):
    state = layer._expert_dropout
    if not layer.training or state["keys_N"] is None:
        return None
    start, end = state["starts"][i], state["starts"][i + 1]
    experts_N = torch.full((end - start,), layer.local_expert_indices[i], dtype=torch.int64)
    return (_apply(layer, args[0], slice(start, end), experts_N), *args[1:])


def _drop_grouped(layer: MoELayer, module, args):
    state = layer._expert_dropout
    if not layer.training or state["keys_N"] is None:
        return None
    counts = torch.tensor([b - a for a, b in zip(state["starts"], state["starts"][1:])])
    experts_N = torch.tensor(layer.local_expert_indices, dtype=torch.int64).repeat_interleave(
        counts
    )
    return (_apply(layer, args[0], slice(0, state["starts"][-1]), experts_N), *args[1:])


def _mix32(x: torch.Tensor) -> torch.Tensor:
    return noise.mix32(x)
