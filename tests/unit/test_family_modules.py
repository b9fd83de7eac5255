"""The model families' own modules against references written out here with plain torch:
GRIN's SparseMixer-v2 (values, choices and its gradient estimator), Yuan's attention router and
Localized Filtering, and the token-keyed routing noise."""

from __future__ import annotations

import pytest
import torch

from moe_parallel.model.layers.lfa import LocalizedFiltering
from moe_parallel.model.routers import noise
from moe_parallel.model.routers.attention import expert_attention
from moe_parallel.model.routers.sparsemixer import SparseMixerDraws, sparsemixer_v2_top2

T, E = 64, 8
EPS = 0.01  # GRIN's router jitter: mask threshold 2 * 0.01


# --- SparseMixer-v2: the paper's estimator, written independently -------------------------


def reference_choice(z, removed, u_gumbel, u_heun):
    """One choice of SparseMixer-v2 (GRIN appendix A, algorithm 1) per token, as a surrogate
    whose value is omega * pi_c and whose gradient is that of pi_c alone.

    z [T, E] logits; removed [T, E] bool (earlier choices)."""
    out_w, out_c, unmasked = [], [], []
    for t in range(z.shape[0]):
        logits = z[t]
        allowed = ~removed[t]
        top = logits[allowed].max().detach()
        rel = (top - logits.detach()) / torch.maximum(logits.detach().abs(), top)
        keep = allowed & ~(rel > 2 * EPS)
        masked = torch.where(keep, logits, torch.tensor(float("-inf")))
        pi = torch.exp(masked - masked.max()) / torch.exp(masked - masked.max()).sum()
        if u_gumbel is None:
            c = int(
                torch.argmax(torch.where(allowed, logits.detach(), torch.tensor(float("-inf"))))
            )
            w = pi[c]
        else:
            g = -torch.log(-torch.log(u_gumbel[t].double())).float()
            c = int(torch.argmax(masked.detach() + g))
            is_max = c == int(torch.argmax(pi.detach()))
            omega = 1.0 if (is_max or float(u_heun[t]) > 0.75) else 1.0 / 3.0
            w = (omega * pi[c]).detach() + pi[c] - pi[c].detach()
        out_w.append(w)
        out_c.append(c)
        unmasked.append(keep)
    return torch.stack(out_w), torch.tensor(out_c), torch.stack(unmasked)


def reference_top2(z, draws):
    none = torch.zeros_like(z, dtype=torch.bool)
    d = draws
    w1, c1, m1 = reference_choice(z, none, d and d.gumbel_1_TE, d and d.heun_1_T)
    removed = none.clone()
    removed[torch.arange(z.shape[0]), c1] = True
    w2, c2, m2 = reference_choice(z, removed, d and d.gumbel_2_TE, d and d.heun_2_T)
    # A choice among several unmasked experts passes a gradient to each of them; a choice with
    # a single expert left is certain (pi_c = 1) and passes none.
    informative = (m1 & (m1.sum(-1, keepdim=True) > 1)) | (m2 & (m2.sum(-1, keepdim=True) > 1))
    return torch.stack([w1, w2], -1), torch.stack([c1, c2], -1), informative


def logits_and_draws(seed=0):
    g = torch.Generator().manual_seed(seed)
    # Logits close to each other (small relative gaps) so that the mask keeps several experts
    # for some tokens and one for others.
    z = (1.0 + 0.02 * torch.randn(T, E, generator=g)) * torch.randn(T, 1, generator=g).sign()
    z = z + 0.05 * torch.randn(T, E, generator=g) * (torch.rand(T, 1, generator=g) > 0.5)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)

    return z, SparseMixerDraws(rand(T, E), rand(T, E), rand(T), rand(T))


def test_sparsemixer_training_values_choices_and_gradient_match_the_reference():
    z, draws = logits_and_draws()
    upstream = torch.randn(T, 2, generator=torch.Generator().manual_seed(1))
    ours = z.clone().requires_grad_()
    w, c = sparsemixer_v2_top2(ours, 2 * EPS, draws)
    (w * upstream).sum().backward()
    ref = z.clone().requires_grad_()
    w_ref, c_ref, unmasked = reference_top2(ref, draws)
    (w_ref * upstream).sum().backward()
    assert torch.equal(c, c_ref)
    assert torch.allclose(w, w_ref, atol=1e-6, rtol=1e-5)
    assert torch.allclose(ours.grad, ref.grad, atol=1e-6, rtol=1e-5)
    # The test exercises both branches: sampled non-argmax experts, several experts unmasked.
    assert (c[:, 0] != z.argmax(-1)).any()
    assert (unmasked.sum(-1) > 2).any() and (unmasked.sum(-1) < 2).any()
    # ... and the Heun scaling: some sampled non-argmax choices carry a third of their weight.
    pi_first = torch.stack(
        [
            torch.softmax(
                z[t].masked_fill(
                    (z[t].max() - z[t]) / z[t].abs().clamp(min=z[t].max()) > 2 * EPS, float("-inf")
                ),
                -1,
            )[c[t, 0]]
            for t in range(T)
        ]
    )
    assert torch.isclose(w[:, 0].detach(), pi_first / 3).any()
    assert torch.isclose(w[:, 0].detach(), pi_first).any()


def test_sparsemixer_gradient_differs_from_top_k_exactly_where_the_paper_says():
    """Straight-through top-k (softmax over the kept logits): only the chosen experts' logits get
    a gradient. SparseMixer-v2: every expert inside a choice's mask does (chosen or not), unless
    the mask left that choice a single expert; experts outside the masks get none."""
    z, draws = logits_and_draws(seed=3)
    upstream = torch.randn(T, 2, generator=torch.Generator().manual_seed(4))
    ours = z.clone().requires_grad_()
    w, c = sparsemixer_v2_top2(ours, 2 * EPS, draws)
    (w * upstream).sum().backward()
    _, _, unmasked = reference_top2(z.clone(), draws)

    topk = z.clone().requires_grad_()
    kept, idx = topk.topk(2, dim=-1)
    (torch.softmax(kept, -1) * upstream).sum().backward()
    chosen_topk = torch.zeros_like(z, dtype=torch.bool).scatter(-1, idx, True)

    assert torch.equal(topk.grad != 0, chosen_topk)
    assert torch.equal(ours.grad != 0, unmasked)
    unchosen_inside_mask = unmasked & ~torch.zeros_like(unmasked).scatter(-1, c, True)
    assert unchosen_inside_mask.any()  # where the two estimators differ in support


def test_sparsemixer_evaluation_is_deterministic_top2_with_masked_softmax_weights():
    z, _ = logits_and_draws(seed=5)
    w, c = sparsemixer_v2_top2(z, 2 * EPS, None)
    w_ref, c_ref, _ = reference_top2(z, None)
    assert torch.equal(c, z.topk(2, dim=-1).indices) or torch.equal(c, c_ref)
    assert torch.equal(c, c_ref)
    assert torch.allclose(w, w_ref, atol=1e-6)
    assert torch.equal(w, sparsemixer_v2_top2(z, 2 * EPS, None)[0])


# --- Yuan 2.0-M32 attention router ---------------------------------------------------------


def test_attention_router_logits_match_yuans_formula():
    g = torch.Generator().manual_seed(0)
    d = 16
    x = torch.randn(5, 3, d, generator=g)
    w = torch.randn(3 * E, d, generator=g) * 0.3
    ours = expert_attention(x @ w.t())
    wq, wk, wv = w.chunk(3)
    ref = torch.empty(5, 3, E)
    for s in range(5):
        for b in range(3):
            q, k, v = wq @ x[s, b], wk @ x[s, b], wv @ x[s, b]  # [E]
            att = torch.softmax(torch.outer(q, k), dim=-1)  # [E, E]
            ref[s, b] = att @ v
    assert torch.allclose(ours, ref, atol=1e-5)
    # Not a linear gate: scaling the input does not scale the logits.
    assert not torch.allclose(expert_attention((2 * x) @ w.t()), 2 * ours, atol=1e-3)


# --- Yuan 2.0 Localized Filtering --------------------------------------------------------------


def test_localized_filtering_matches_yuans_conv2d_formulation():
    torch.manual_seed(0)
    S, B, d = 7, 2, 8
    lf = LocalizedFiltering(d, eps=1e-6, dtype=torch.float32)
    with torch.no_grad():
        for conv in (lf.conv1, lf.conv2):
            conv.weight.normal_(0, 0.3)
            conv.bias.normal_(0, 0.1)
        lf.output_layernorm.weight.uniform_(0.5, 1.5)
    x = torch.randn(S, B, d)

    def conv_causal(conv, h_BdS1):  # Yuan: Conv2d kernel (2, 1), pad 1 on the sequence, truncate
        out = torch.nn.functional.conv2d(h_BdS1, conv.weight, conv.bias, padding=(1, 0))
        return out[:, :, :S, :]

    h = x.permute(1, 2, 0).unsqueeze(-1)  # [B, d, S, 1]
    y = conv_causal(lf.conv2, conv_causal(lf.conv1, h))
    y = y.squeeze(-1).permute(2, 0, 1)  # [S, B, d]
    ref = torch.nn.functional.rms_norm(y + x, (d,), lf.output_layernorm.weight, eps=1e-6)
    assert torch.allclose(lf(x), ref, atol=1e-5)
    # Causal: a token never sees a later one; it does see the two before it.
    x2 = x.clone()
    x2[4] += 1.0
    changed = (lf(x2) - lf(x)).abs().amax(dim=(1, 2)) > 1e-6
    assert changed.tolist() == [False, False, False, False, True, True, True]


# --- token-keyed routing noise --------------------------------------------------------------


def test_routing_noise_depends_on_the_token_not_the_layout():
    noise.set_seed(1234)
    with noise.samples(torch.tensor([10, 11, 12, 13])):
        full = noise.token_uniforms(
            layer=3, draw=0, seq_offset=0, seq_len=8, width=E, device=torch.device("cpu")
        )
        # A sequence-parallel rank holding positions 4..7 draws the same numbers for them.
        half = noise.token_uniforms(3, 0, 4, 4, E, torch.device("cpu"))
        other_layer = noise.token_uniforms(4, 0, 0, 8, E, torch.device("cpu"))
    # A data-parallel rank holding samples 12, 13 alone draws the same numbers for them.
    with noise.samples(torch.tensor([12, 13])):
        dp_rank = noise.token_uniforms(3, 0, 0, 8, E, torch.device("cpu"))
    assert torch.equal(full[4:], half)
    assert torch.equal(full[:, 2:], dp_rank)
    assert not torch.equal(full, other_layer)
    assert full.min() > 0 and full.max() < 1
    big = torch.cat([full.flatten(), other_layer.flatten()])
    assert abs(big.mean().item() - 0.5) < 0.05 and abs(big.var().item() - 1 / 12) < 0.01
    noise.set_samples(None)
    with pytest.raises(RuntimeError, match="no training batch named its samples"):
        noise.current_samples()
