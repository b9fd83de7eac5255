"""A rank program for the PESC test (world size 1): one adapter MoE layer of the tiny twin
against PESC's equations written out here with plain torch (Camelidae's loop over tokens and
chosen experts); writes the largest difference to RUN_DIR/check.json.

    python tests/integration/pesc_layer_check.py RUN_DIR     (RUN_DIR/config.yaml: the twin)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moe_parallel.runtime.bootstrap import prepare_process, start_rank, stop_rank  # noqa: E402


def shared_ffn(x_Td, layer) -> torch.Tensor:
    """h = FFN(x): the twin's gated SiLU FFN, shared by every expert."""
    fc1, fc2 = layer.shared_ffn.linear_fc1.weight, layer.shared_ffn.linear_fc2.weight
    gate, up = (x_Td @ fc1.t()).chunk(2, -1)
    return (F.silu(gate) * up) @ fc2.t()


def reference(
    x_Td, layer, top_k: int, scaling: float, pre_softmax: bool, act=F.gelu
) -> torch.Tensor:
    """y = sum_{i in top-k} g_i (h + s * GELU(h W_down_i) W_up_i), h = FFN(x), router on x."""
    h_Td = shared_ffn(x_Td, layer)
    logits = x_Td @ layer.router.weight.t()
    if pre_softmax:  # softmax over all experts, then the top-k (weights sum to < 1)
        weights, chosen = torch.topk(logits.softmax(-1), top_k, dim=-1)
    else:  # softmax over the kept top-k logits (PESC eq. 9)
        weights, chosen = torch.topk(logits, top_k, dim=-1)
        weights = weights.softmax(-1)
    out = torch.zeros_like(h_Td)
    for t in range(h_Td.shape[0]):
        for j in range(top_k):
            expert = layer.experts.local_experts[int(chosen[t, j])]
            adapter = act(h_Td[t] @ expert.linear_fc1.weight.t()) @ expert.linear_fc2.weight.t()
            out[t] += weights[t, j] * (h_Td[t] + scaling * adapter)
    return out


def make_the_adapters_matter(layer, x_Td, scaling: float) -> dict:
    """Draws each expert's adapter weights so that the check can see the adapter: with the
    default init its term is ~1e-4 of the output and its activation's input ~1e-4, where GELU
    and SiLU agree. Here the activation's input has unit scale (where GELU(1) = 0.84 and
    SiLU(1) = 0.73) and the scaled adapter term is as large as h. Returns the scales reached."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        h_Td = shared_ffn(x_Td, layer)
        rms = h_Td.pow(2).mean().sqrt()
        for expert in layer.experts.local_experts:
            down, up = expert.linear_fc1.weight, expert.linear_fc2.weight  # [a, d], [d, a]
            a, d = down.shape
            down.copy_(torch.randn(a, d, generator=g) / (d**0.5 * rms))
            up.copy_(torch.randn(d, a, generator=g) * rms / (a**0.5 * scaling))
        expert = layer.experts.local_experts[0]
        into_act = h_Td @ expert.linear_fc1.weight.t()
        term = scaling * (F.gelu(into_act) @ expert.linear_fc2.weight.t())
    return {
        "activation_input_std": into_act.std().item(),
        "adapter_to_h": (term.norm() / h_Td.norm()).item(),
    }


def main(run_dir: Path) -> None:
    from moe_parallel.config import load_config
    from moe_parallel.model.build import build_train_objects
    from moe_parallel.train.one_rank import ONE_RANK

    result = {}
    for pre_softmax in (False, True):
        cfg = load_config(
            run_dir / "config.yaml",
            [*ONE_RANK, "model.vocab_size=512", f"model.moe.pre_softmax={pre_softmax}"],
        )
        if not result:
            start_rank(cfg, "cpu")
        model = build_train_objects(cfg, 512, on_cpu=True).model[0].module
        moe = cfg.model.moe
        worst, silu_best, scales = 0.0, float("inf"), []
        for index, block in enumerate(model.decoder.layers):
            layer = block.mlp
            layer.eval()
            torch.manual_seed(index)
            x = torch.randn(16, 2, cfg.model.hidden_size)
            x_Td = x.reshape(-1, x.shape[-1])
            scales.append(make_the_adapters_matter(layer, x_Td, moe.moe_scaling))
            with torch.no_grad():
                got, bias = layer(x)
                got = got.reshape(x_Td.shape)
                want = reference(x_Td, layer, moe.top_k, moe.moe_scaling, pre_softmax)
                # The same equations with the wrong activation: the check must tell them apart.
                silu = reference(x_Td, layer, moe.top_k, moe.moe_scaling, pre_softmax, F.silu)
            assert bias is None
            worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
            silu_best = min(silu_best, ((got - silu).abs().max() / silu.abs().max()).item())
        result[f"silu_rel_diff_pre_softmax_{pre_softmax}"] = silu_best
        result["activation_input_std_min"] = min(s["activation_input_std"] for s in scales)
        result["adapter_to_h_min"] = min(s["adapter_to_h"] for s in scales)
        result[f"max_rel_diff_pre_softmax_{pre_softmax}"] = worst
        result["layers"] = len(model.decoder.layers)
        result["trainable_all"] = all(p.requires_grad for p in model.parameters())
    (run_dir / "check.json").write_text(json.dumps(result, indent=1))
    stop_rank()


if __name__ == "__main__":
    prepare_process("cpu")
    main(Path(sys.argv[1]))
