"""PEER (model/layers/peer.py): product-key retrieval equals brute force over all N keys, the
chunked expert step equals a dense reference (values and gradients), the layout-invariant init
gives the same tables for any EP, and the full-scale config's parameter count equals a formula
written out here from the paper's definitions."""

from __future__ import annotations

import math

import pytest
import torch

from moe_parallel.config import load_config
from moe_parallel.model.layers.peer import pair_experts, peer_reference, product_key_topk
from moe_parallel.plan.params import count_parameters
from tests.conftest import REPO


@pytest.mark.parametrize("n,k,heads,c", [(32, 8, 4, 32), (64, 16, 8, 16), (16, 16, 2, 8)])
def test_product_key_topk_equals_brute_force_top_k(n, k, heads, c):
    torch.manual_seed(n + k)
    q = torch.randn(200, heads, c, dtype=torch.float64)
    keys = torch.randn(2, n, c // 2, dtype=torch.float64)
    scores, experts = product_key_topk(q, keys, k)
    full = (q[..., : c // 2] @ keys[0].t()).unsqueeze(-1) + (
        q[..., c // 2 :] @ keys[1].t()
    ).unsqueeze(-2)
    full = full.flatten(-2)  # [T, h, N], expert a * n + b
    assert full.shape[-1] == n * n
    best_scores, best_experts = full.topk(k, dim=-1)
    torch.testing.assert_close(scores, best_scores, rtol=0, atol=1e-12)
    assert torch.equal(experts, best_experts)
    # and the retrieved scores are those experts' scores
    torch.testing.assert_close(full.gather(-1, experts), scores, rtol=0, atol=1e-12)


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_chunked_expert_step_equals_the_dense_reference_values_and_gradients(activation):
    torch.manual_seed(0)
    T, d, heads, c, n, k = 40, 12, 3, 8, 8, 5
    x = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    q = torch.randn(T, heads, c, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(2, n, c // 2, dtype=torch.float64, requires_grad=True)
    down = torch.randn(n * n, d, dtype=torch.float64, requires_grad=True)
    up = torch.randn(n * n, d, dtype=torch.float64, requires_grad=True)
    leaves = (x, q, keys, down, up)

    ref = peer_reference(x, q, keys, down, up, k, activation)
    probe = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * probe).sum(), leaves)

    scores, experts = product_key_topk(q, keys, k)
    gates = scores.softmax(-1).reshape(T, -1)
    experts = experts.reshape(T, -1)
    tok = torch.arange(T).repeat_interleave(heads * k)
    slot = torch.arange(heads * k).repeat(T)
    out = pair_experts(
        x, tok, experts[tok, slot], gates[tok, slot], down, up, activation, chunk=37
    )  # chunks that do not divide the pairs
    grads = torch.autograd.grad((out * probe).sum(), leaves)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for name, g, r in zip(("x", "q", "keys", "down", "up"), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12, msg=name)


def test_expert_step_gradcheck():
    torch.manual_seed(1)
    T, d, R = 6, 4, 10
    x = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    down = torch.randn(R, d, dtype=torch.float64, requires_grad=True)
    up = torch.randn(R, d, dtype=torch.float64, requires_grad=True)
    tok = torch.tensor([0, 0, 1, 2, 2, 2, 3, 5, 5])
    row = torch.tensor([1, 3, 3, 0, 9, 1, 4, 4, 2])
    gate = torch.rand(9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, g, u, v: pair_experts(x, tok, row, g, u, v, "gelu", 4), (x, gate, down, up)
    )


def test_layout_invariant_init_gives_the_same_tables_for_any_expert_parallel_size():
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from moe_parallel.model import init

    rows, d = 12600, 4  # three blocks and a part; divisible by 2, 4 and 7
    key = "decoder.layers.2.mlp.expert_up.weight"

    def shards(ep):
        out = []
        for r in range(ep):
            data = torch.empty(rows // ep, d)
            sh = ShardedTensor.from_rank_offsets(key, data, (0, r, ep))
            init._init_row_blocks(sh, seed=7, std=0.02)
            out.append(data)
        return torch.cat(out)

    one = shards(1)
    assert one.std().item() == pytest.approx(0.02, rel=0.05)
    for ep in (2, 4, 7):
        assert torch.equal(shards(ep), one), ep


def test_full_scale_peer_count_equals_the_papers_formula():
    """Formula from the paper's definitions (arXiv 2407.04153 section 2 and Algorithm 1; the
    dense transformer as Megatron builds it), written out independently of plan/params.py:
    a PEER layer holds N down and N up vectors of size d, h query projections d -> c with a
    BatchNorm (scale and shift per feature), and two sets of sqrt(N) sub-keys of size c/2."""
    cfg = load_config(REPO / "configs" / "models" / "peer_12l_1m.yaml")
    m, p = cfg.model, cfg.model.peer
    d, L, V, f = m.hidden_size, m.num_layers, m.vocab_size, m.ffn_hidden_size
    N, h, k, c = p.num_experts, p.heads, p.top_k, p.key_dim
    assert (N, h, k, len(p.layers), L) == (1024**2, 8, 16, 1, 12)
    peer_total = 2 * N * d + h * (c * d + 2 * c) + 2 * math.isqrt(N) * (c // 2)
    peer_active = 2 * h * k * d + h * (c * d + 2 * c) + 2 * math.isqrt(N) * (c // 2)
    attention = 4 * d * d + (4 * d if m.add_bias_linear else 0)
    norms = 2 * d * (2 if m.normalization == "LayerNorm" else 1)
    ffn = 2 * d * f + ((f + d) if m.add_bias_linear else 0)
    final_norm = d * (2 if m.normalization == "LayerNorm" else 1)
    ends = V * d * (1 if m.tie_embeddings else 2) + final_norm
    total = L * (attention + norms) + (L - 1) * ffn + peer_total + ends
    active = L * (attention + norms) + (L - 1) * ffn + peer_active + ends
    count = count_parameters(m)
    assert count.total == total
    assert count.active == active
    # The tables dominate: 2 x 2^20 x d of the total.
    assert 2 * N * d / count.total > 0.85


def test_peer_layer_forward_equals_the_dense_reference():
    """The Megatron module (one rank: whole tables) against peer_reference on its own query."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from moe_parallel.model.layers.peer import PeerLayer, PeerSettings

    torch.manual_seed(3)
    config = TransformerConfig(
        num_layers=1,
        hidden_size=16,
        num_attention_heads=1,
        params_dtype=torch.float64,
        use_cpu_initialization=True,
        init_method_std=0.5,
    )
    layer = PeerLayer(
        config, PeerSettings(num_experts=100, heads=3, top_k=4, key_dim=8, chunk=50)
    ).double()
    x = torch.randn(7, 5, 16, dtype=torch.float64)
    out, bias = layer(x)
    assert bias is None and out.shape == x.shape
    x_Td = x.reshape(35, 16)
    q = torch.nn.functional.batch_norm(
        x_Td @ layer.query.weight.t(),
        None,
        None,
        layer.query_norm.weight,
        layer.query_norm.bias,
        training=True,
        eps=layer.query_norm.eps,
    )
    ref = peer_reference(
        x_Td,
        q.view(35, 3, 8),
        layer.product_keys.weight,
        layer.expert_down.weight,
        layer.expert_up.weight,
        4,
    )
    torch.testing.assert_close(out.reshape(35, 16), ref, rtol=1e-10, atol=1e-12)
