"""PEER, Parameter Efficient Expert Retrieval ("Mixture of A Million Experts", He 2024,
arXiv 2407.04153): an FFN replacement that retrieves, per token, a few of N singleton experts
e_i(x) = act(u_i . x) v_i through product keys.

    q_h   = BatchNorm(W_h x)                        per head h (h query nets, one matrix)
    s_h,i = q_h[:c/2] . K1[i // n] + q_h[c/2:] . K2[i % n]      n = sqrt(N), c = key_dim
    I_h   = top-k_i s_h,i   (exactly: top-k of each half, then top-k of the k x k sums)
    y     = sum_h sum_{i in I_h} softmax_{I_h}(s_h)_i * act(u_i . x) * v_i

The heads share the expert pool and the product keys (paper section 2, "multi-head
retrieval"); the scores are a softmax over each head's k retrieved experts (Algorithm 1).

Sharding. The down (u) and up (v) tables, N x d each, are expert-parallel parameters: rank r of
the expert-parallel group holds rows [r N/EP, (r+1) N/EP) of both (``allreduce = False``, so
Megatron reduces their gradients over the expert-data-parallel group, as for MoE experts). The
query net, its BatchNorm and the product keys are dense (replicated) parameters. Each rank
retrieves for its own tokens, then the ranks of the expert-parallel group all-gather tokens,
expert ids and gates (like Megatron's allgather dispatcher), every rank computes the
contributions of the experts it holds to every gathered token, and a reduce-scatter sums them
back onto the tokens' own ranks. EP1 and EP>1 compute the same sums (rounding aside).

What is materialised. The retrieval holds [T, h, n] sub-key scores per half and [T, h, k, k]
candidate sums. The expert step never builds [T, h*k, d]: the (token, expert) pairs a rank
owns (M of them, about T*h*k on average) are processed in chunks of ``chunk`` pairs, each chunk
gathering [chunk, d] rows of u, v and x; the backward recomputes those gathers chunk by chunk.
Saved for backward: the pair lists and pre-activations ([M] each), not the gathered rows.

The query BatchNorm normalises with the statistics of the current micro-batch in training and
in evaluation (no running averages: they would differ between data-parallel ranks and make the
model depend on the layout). Every layout sees the same micro-batches (train/batches.py), so
the statistics, and the model, are the same for any DP/EP/PP. Tensor and context parallelism
(which split a micro-batch's tokens) are refused by the config rules.

Shapes: T tokens of this rank, A tokens of the expert-parallel group (EP x T), d hidden,
h heads, c key dim, n sqrt(N) sub-keys per half, k retrieved per head, K = h*k slots per token,
M (token, expert) pairs owned by this rank, R = N/EP table rows of this rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.tensor_parallel.mappings import (
    _gather_along_first_dim,
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "sigmoid": torch.sigmoid}
TABLES = ("expert_down", "expert_up")


@dataclass(frozen=True)
class PeerSettings:
    num_experts: int
    heads: int
    top_k: int
    key_dim: int
    activation: str = "gelu"
    batch_norm: bool = True
    chunk: int = 16384  # (token, expert) pairs per gather chunk

    @classmethod
    def from_config(cls, peer) -> "PeerSettings":
        return cls(
            num_experts=peer.num_experts,
            heads=peer.heads,
            top_k=peer.top_k,
            key_dim=peer.key_dim,
            activation=peer.activation,
            batch_norm=peer.query_batch_norm,
            chunk=peer.gather_chunk,
        )


# ---------------------------------------------------------------------------------------------
# Retrieval


def product_key_topk(q_Thc: torch.Tensor, keys_2nc: torch.Tensor, k: int):
    """Top-k experts of each head over all N = n^2 product keys, exactly, in O((n + k^2) c).

    Expert i = a * n + b has the score q[:c/2] . K1[a] + q[c/2:] . K2[b]; the top-k of the sums
    lie among the top-k of each half. Returns (scores_Thk, experts_Thk), best first.
    """
    half = q_Thc.shape[-1] // 2
    n = keys_2nc.shape[1]
    s1_Thn = q_Thc[..., :half] @ keys_2nc[0].t()
    s2_Thn = q_Thc[..., half:] @ keys_2nc[1].t()
    v1_Thk, i1_Thk = s1_Thn.topk(k, dim=-1)
    v2_Thk, i2_Thk = s2_Thn.topk(k, dim=-1)
    cand_Thkk = v1_Thk.unsqueeze(-1) + v2_Thk.unsqueeze(-2)
    scores_Thk, flat_Thk = cand_Thkk.flatten(-2).topk(k, dim=-1)
    a_Thk = i1_Thk.gather(-1, torch.div(flat_Thk, k, rounding_mode="floor"))
    b_Thk = i2_Thk.gather(-1, flat_Thk % k)
    return scores_Thk, a_Thk * n + b_Thk


# ---------------------------------------------------------------------------------------------
# Experts: y[t] += gate * act(u_row . x[t]) * v_row for each (t, row, gate) pair, chunked


class _PairExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_Ad, tok_M, row_M, gate_M, down_Rd, up_Rd, act_name: str, chunk: int):
        act = _ACTIVATIONS[act_name]
        y_Ad = torch.zeros_like(x_Ad)
        pre_M = torch.empty(tok_M.shape[0], dtype=x_Ad.dtype, device=x_Ad.device)
        for s in range(0, tok_M.shape[0], chunk):
            tok, row = tok_M[s : s + chunk], row_M[s : s + chunk]
            pre = (down_Rd.index_select(0, row) * x_Ad.index_select(0, tok)).sum(-1)
            pre_M[s : s + chunk] = pre
            weight = gate_M[s : s + chunk] * act(pre)
            y_Ad.index_add_(0, tok, up_Rd.index_select(0, row) * weight.unsqueeze(-1))
        ctx.save_for_backward(x_Ad, tok_M, row_M, gate_M, pre_M, down_Rd, up_Rd)
        ctx.act_name, ctx.chunk = act_name, chunk
        return y_Ad

    @staticmethod
    def backward(ctx, gy_Ad):
        x_Ad, tok_M, row_M, gate_M, pre_M, down_Rd, up_Rd = ctx.saved_tensors
        act = _ACTIVATIONS[ctx.act_name]
        gx_Ad = torch.zeros_like(x_Ad)
        gdown_Rd = torch.zeros_like(down_Rd)
        gup_Rd = torch.zeros_like(up_Rd)
        ggate_M = torch.empty_like(gate_M)
        for s in range(0, tok_M.shape[0], ctx.chunk):
            tok, row = tok_M[s : s + ctx.chunk], row_M[s : s + ctx.chunk]
            gate = gate_M[s : s + ctx.chunk]
            with torch.enable_grad():
                pre = pre_M[s : s + ctx.chunk].detach().requires_grad_(True)
                hidden = act(pre)
            gy = gy_Ad.index_select(0, tok)
            g_weight = (gy * up_Rd.index_select(0, row)).sum(-1)  # dL / d(gate * act(pre))
            ggate_M[s : s + ctx.chunk] = g_weight * hidden.detach()
            gup_Rd.index_add_(0, row, gy * (gate * hidden.detach()).unsqueeze(-1))
            (g_pre,) = torch.autograd.grad(hidden, pre, g_weight * gate)
            gdown_Rd.index_add_(0, row, x_Ad.index_select(0, tok) * g_pre.unsqueeze(-1))
            gx_Ad.index_add_(0, tok, down_Rd.index_select(0, row) * g_pre.unsqueeze(-1))
        return gx_Ad, None, None, ggate_M, gdown_Rd, gup_Rd, None, None


def pair_experts(x_Ad, tok_M, row_M, gate_M, down_Rd, up_Rd, activation="gelu", chunk=16384):
    return _PairExperts.apply(x_Ad, tok_M, row_M, gate_M, down_Rd, up_Rd, activation, chunk)


def peer_reference(x_Td, q_Thc, keys_2nc, down_Nd, up_Nd, k, activation="gelu"):
    """Dense reference for tests: scores of all N experts, brute-force top-k, gathered rows."""
    half = q_Thc.shape[-1] // 2
    full_ThN = (q_Thc[..., :half] @ keys_2nc[0].t()).unsqueeze(-1) + (
        q_Thc[..., half:] @ keys_2nc[1].t()
    ).unsqueeze(-2)
    scores_Thk, experts_Thk = full_ThN.flatten(-2).topk(k, dim=-1)
    gates_Thk = scores_Thk.softmax(-1)
    u_Thkd, v_Thkd = down_Nd[experts_Thk], up_Nd[experts_Thk]
    hidden_Thk = _ACTIVATIONS[activation]((u_Thkd * x_Td[:, None, None]).sum(-1))
    return ((gates_Thk * hidden_Thk).unsqueeze(-1) * v_Thkd).sum((1, 2))


# ---------------------------------------------------------------------------------------------
# The Megatron module in the MLP slot


class _Weight(torch.nn.Module):
    def __init__(self, *shape: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(*shape, dtype=dtype))


class PeerLayer(MegatronModule):
    """Megatron MLP-slot module: forward(hidden_states [S, B, d]) -> (output, None)."""

    def __init__(self, config, settings: PeerSettings, **unused) -> None:
        super().__init__(config=config)
        s = settings
        n = math.isqrt(s.num_experts)
        if n * n != s.num_experts or s.key_dim % 2 or s.top_k > n:
            raise ValueError(
                f"PEER needs a square num_experts, an even key_dim and top_k <= "
                f"sqrt(num_experts); got {s}"
            )
        self.settings, self.sqrt_n = s, n
        self.ep_group = _expert_group()
        self.ep_size = self.ep_group.size() if self.ep_group is not None else 1
        self.ep_rank = self.ep_group.rank() if self.ep_group is not None else 0
        if s.num_experts % self.ep_size:
            raise ValueError(
                f"model.peer.num_experts={s.num_experts} is not divisible by "
                f"parallel.expert={self.ep_size}"
            )
        self.rows = s.num_experts // self.ep_size
        d, dtype = config.hidden_size, config.params_dtype
        self.query = _Weight(s.heads * s.key_dim, d, dtype=dtype)
        self.query_norm = (
            torch.nn.BatchNorm1d(s.heads * s.key_dim, track_running_stats=False, dtype=dtype)
            if s.batch_norm
            else None
        )
        self.product_keys = _Weight(2, n, s.key_dim // 2, dtype=dtype)
        self.expert_down = _Weight(self.rows, d, dtype=dtype)
        self.expert_up = _Weight(self.rows, d, dtype=dtype)
        for table in (self.expert_down, self.expert_up):
            table.weight.allreduce = False  # expert-parallel: reduced over expert-DP only
        with torch.no_grad():  # the layout-invariant init (model/init.py) overwrites these
            for w in (self.query, self.product_keys, self.expert_down, self.expert_up):
                w.weight.normal_(0.0, config.init_method_std)

    def retrieve(self, x_Td: torch.Tensor):
        s = self.settings
        q = F.linear(x_Td, self.query.weight)
        if self.query_norm is not None:
            q = self.query_norm(q)
        dtype = torch.promote_types(q.dtype, torch.float32)  # scores and top-k in fp32 at least
        q_Thc = q.to(dtype).view(x_Td.shape[0], s.heads, s.key_dim)
        scores_Thk, experts_Thk = product_key_topk(
            q_Thc, self.product_keys.weight.to(dtype), s.top_k
        )
        return scores_Thk.softmax(-1), experts_Thk

    def forward(self, hidden_states: torch.Tensor, **unused):
        S, B, d = hidden_states.shape
        x_Td = hidden_states.reshape(S * B, d)
        gates_Thk, experts_Thk = self.retrieve(x_Td)
        gates_TK = gates_Thk.reshape(S * B, -1).to(x_Td.dtype)
        experts_TK = experts_Thk.reshape(S * B, -1)
        if self.ep_size > 1:
            group = self.ep_group
            x_Ad = gather_from_sequence_parallel_region(x_Td, True, group=group)
            gates_AK = gather_from_sequence_parallel_region(gates_TK, True, group=group)
            experts_AK = _gather_along_first_dim(experts_TK, group=group)
        else:
            x_Ad, gates_AK, experts_AK = x_Td, gates_TK, experts_TK
        lo, K = self.ep_rank * self.rows, experts_AK.shape[1]
        experts_P, gates_P = experts_AK.reshape(-1), gates_AK.reshape(-1)  # P = A*K slots
        if self.ep_size > 1:  # the slots whose expert this rank holds
            flat_M = ((experts_P >= lo) & (experts_P < lo + self.rows)).nonzero().squeeze(1)
            tok_M = torch.div(flat_M, K, rounding_mode="floor")
            row_M = experts_P.index_select(0, flat_M) - lo
            gate_M = gates_P.index_select(0, flat_M)  # backward: index_add, not index_put
        else:
            tok_M = torch.arange(experts_AK.shape[0], device=x_Td.device).repeat_interleave(K)
            row_M, gate_M = experts_P, gates_P
        y_Ad = pair_experts(
            x_Ad,
            tok_M,
            row_M,
            gate_M,
            self.expert_down.weight,
            self.expert_up.weight,
            self.settings.activation,
            self.settings.chunk,
        )
        if self.ep_size > 1:
            y_Td = reduce_scatter_to_sequence_parallel_region(y_Ad, group=self.ep_group)
        else:
            y_Td = y_Ad
        return y_Td.view(S, B, d), None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Dense tensors replicated over DP; the tables sharded on rows over EP (global [N, d]),
        replicated over the expert-data-parallel group, so a checkpoint reshards to any EP."""
        dense = {}
        self._save_to_state_dict(dense, "", keep_vars=True)
        for name, module in self.named_children():
            if name in TABLES:
                continue
            for key, value in module.state_dict(prefix=f"{name}.", keep_vars=True).items():
                dense[key] = value
        dp_cp = (metadata or {}).get("dp_cp_group") or parallel_state.get_data_parallel_group(
            with_context_parallel=True
        )
        out = make_sharded_tensors_for_checkpoint(
            dense,
            prefix,
            sharded_offsets=sharded_offsets,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
            dp_cp_group=dp_cp,
        )
        expert_dp_rank = (
            parallel_state.get_expert_data_parallel_rank() if self.ep_group is not None else 0
        )
        prepend = len(sharded_offsets)
        for name in TABLES:
            key = f"{prefix}{name}.weight"
            out[key] = ShardedTensor.from_rank_offsets(
                key,
                getattr(self, name).weight,
                *sharded_offsets,
                (prepend, self.ep_rank, self.ep_size),
                replica_id=(0, 0, expert_dp_rank),
                prepend_axis_num=prepend,
            )
        return out


def _expert_group():
    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_expert_model_parallel_group()
