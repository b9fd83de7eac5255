"""Mixture-of-Depths layer checks on one CPU rank (a separate process: it switches on the CPU
adapter and a 1-rank process group). Run by tests/unit/test_mixture_of_depths.py; prints one
JSON object of measurements:

    python -m tests.unit.mod_layer_checks
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TWIN = REPO / "configs" / "tiny" / "mod_moe_tiny.yaml"
VOCAB = 512


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup():
    os.environ.update(
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        MOE_PARALLEL_DEVICE="cpu",
    )
    from moe_parallel.runtime.bootstrap import start_rank
    from moe_parallel.train.one_rank import one_rank_config

    start_rank(one_rank_config(TWIN), "cpu")


def _model(overrides=()):
    from moe_parallel.config.megatron import transformer_config
    from moe_parallel.model.builder import build_model_chunks
    from moe_parallel.train.one_rank import one_rank_config

    cfg = one_rank_config(TWIN, list(overrides))
    return build_model_chunks(cfg, transformer_config(cfg, on_cpu=True), VOCAB, False)[0], cfg


def _layer_inputs(model, S, B, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, B, model.config.hidden_size, generator=g)
    return x, model.rotary_pos_emb(S)


def check_token_counts(out: dict) -> None:
    """Every routed block runs attention and MLP (MoE experts included) on exactly
    ceil(capacity x S) tokens of each sequence: the router's top-k, in order."""
    import torch

    S, B = 128, 2
    for capacity in (0.125, 0.1, 0.5):
        model, _ = _model([f"model.mod.capacity={capacity}"])
        model.train()
        seen = {}
        hooks = []
        for i, layer in enumerate(model.decoder.layers):
            for part in ("self_attention", "mlp"):
                hooks.append(
                    getattr(layer, part).register_forward_pre_hook(
                        lambda m, args, kw=None, key=(i, part): seen.__setitem__(
                            key, tuple((args[0] if args else kw["hidden_states"]).shape)
                        ),
                        with_kwargs=False,
                    )
                )
        layer = model.decoder.layers[1]
        x, rope = _layer_inputs(model, S, B)
        y, _ = layer(hidden_states=x, rotary_pos_emb=rope)
        k = math.ceil(capacity * S)
        chosen = layer.chosen_mask(x)
        skipped_same = bool(torch.equal(y[~chosen], x[~chosen]))
        changed = bool((y[chosen] != x[chosen]).any(-1).all())
        top = layer.mod_router(x).squeeze(-1).topk(k, dim=0).indices.sort(0).values
        out[f"capacity_{capacity}"] = {
            "expected_k": k,
            "attention_input": seen[(1, "self_attention")][:2],
            "mlp_input": seen[(1, "mlp")][:2],
            "chosen_per_sequence": chosen.sum(0).tolist(),
            "skipped_tokens_unchanged": skipped_same,
            "chosen_tokens_changed": changed,
            "chosen_are_router_top_k": bool(
                torch.equal(chosen, torch.zeros_like(chosen).scatter(0, top, True))
            ),
        }
        for h in hooks:
            h.remove()


def check_capacity_one(out: dict) -> None:
    """capacity 1: the routed block is the plain Megatron block, its update scaled by r_i."""
    import torch

    mod, _ = _model(["model.mod.capacity=1.0"])
    plain, _ = _model(["model.mod=null"])
    mod.train(), plain.train()
    x, rope = _layer_inputs(mod, 128, 2, seed=1)
    y, _ = mod.decoder.layers[1](hidden_states=x, rotary_pos_emb=rope)
    y_plain, _ = plain.decoder.layers[1](hidden_states=x, rotary_pos_emb=rope)
    r = mod.decoder.layers[1].mod_router(x)
    expected = x + r * (y_plain - x)
    out["capacity_one"] = {
        "max_abs_diff": float((y - expected).abs().max()),
        "scale": float(expected.abs().max()),
        "same_block_weights": all(
            torch.equal(p, dict(plain.named_parameters())[n])
            for n, p in mod.named_parameters()
            if "mod_" not in n
        ),
    }


def check_causal_choice(out: dict) -> None:
    """Evaluation: each routed layer's choice for token t depends on tokens <= t only (the
    predictor, and router_bce's threshold); training's top-k does depend on later tokens."""
    import torch

    results = {}
    for causal in ("predictor", "router_bce"):
        model, _ = _model([f"model.mod.causal={causal}"])
        g = torch.Generator().manual_seed(2)
        tokens = torch.randint(0, VOCAB, (2, 128), generator=g)
        changed = tokens.clone()
        cut = 64
        changed[:, cut:] = torch.randint(0, VOCAB, (2, 128 - cut), generator=g)
        pos = torch.arange(128).expand(2, 128)

        def run(tok, training):
            model.train(training)
            masks = {}
            hooks = [
                layer.register_forward_pre_hook(
                    lambda m, args, kw, i=i: masks.__setitem__(
                        i, m.chosen_mask(kw["hidden_states"])
                    ),
                    with_kwargs=True,
                )
                for i, layer in enumerate(model.decoder.layers)
                if layer.is_routed
            ]
            with torch.no_grad():
                logits = model(tok, pos, None)
            for h in hooks:
                h.remove()
            return masks, logits

        m1, l1 = run(tokens, False)
        m2, l2 = run(changed, False)
        t1, _ = run(tokens, True)
        t2, _ = run(changed, True)
        results[causal] = {
            "eval_same_choice_before_cut": all(torch.equal(m1[i][:cut], m2[i][:cut]) for i in m1),
            "eval_chosen_fraction": float(sum(m.float().mean() for m in m1.values()) / len(m1)),
            "eval_logits_before_cut_max_diff": float((l1[:, :cut] - l2[:, :cut]).abs().max()),
            "eval_logits_after_cut_differ": bool((l1[:, cut:] - l2[:, cut:]).abs().max() > 1e-3),
            "train_topk_changed_before_cut": any(
                not torch.equal(t1[i][:cut], t2[i][:cut]) for i in t1
            ),
        }
    out["causal"] = results


def _layer_backward(layer, x, rope, head_d):
    """A training forward of the routed layer and the backward of a stand-in LM loss (a fixed
    projection of the layer's output); the layer's own auxiliary loss rides on its output
    through MoEAuxLossAutoScaler, as in a real step. Returns (output, each parameter's grad)."""

    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()  # its grad is what reaches the layers below
    y, _ = layer(hidden_states=x, rotary_pos_emb=rope)
    (y.float() @ head_d).square().mean().backward()
    grads = {"input": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    return y.detach(), {n: g if g is None else g.clone() for n, g in grads.items()}


def check_aux_loss_path(out: dict) -> None:
    """The product's auxiliary loss (``_attach_aux_loss``) against the same step with its
    coefficient at 0: which parameters' gradients it changes, and whether the output moves."""
    import dataclasses

    import torch

    results = {}
    for causal in ("predictor", "router_bce"):
        model, _ = _model([f"model.mod.causal={causal}", "model.mod.predictor_hidden_size=64"])
        layer = model.decoder.layers[1]
        layer.train()
        x, rope = _layer_inputs(model, 128, 4, seed=4)
        head_d = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(5))
        y_on, grads_on = _layer_backward(layer, x, rope, head_d)
        routing = layer.routing
        layer.routing = dataclasses.replace(routing, aux_loss_coeff=0.0)
        y_off, grads_off = _layer_backward(layer, x, rope, head_d)
        layer.routing = routing
        y_again, grads_again = _layer_backward(layer, x, rope, head_d)

        def changed(a, b):  # a missing grad (None) differs from any tensor
            same = {n for n in a if a[n] is None and b[n] is None}
            same |= {n for n in a if None not in (a[n], b[n]) and torch.equal(a[n], b[n])}
            return sorted(set(a) - same)

        results[causal] = {
            "output_unchanged": bool(torch.equal(y_on, y_off)),
            "grads_changed_by_aux_loss": changed(grads_on, grads_off),
            "rerun_changes": changed(grads_on, grads_again),  # the step is deterministic
            "aux_grads_nonzero": sorted(
                n
                for n in changed(grads_on, grads_off)
                if grads_on[n] is not None and grads_on[n].abs().max() > 0
            ),
        }
    out["aux_loss_path"] = results


def check_predictor_learns(out: dict) -> None:
    """The predictor, trained only by the layer's own auxiliary loss (training steps of the
    product's forward and a stand-in LM loss; the optimizer holds the predictor alone, so its
    targets stay put), predicts top-k membership on sequences it has not seen (the paper:
    97-99%)."""
    import torch

    model, _ = _model(["model.mod.predictor_hidden_size=64"])
    layer = model.decoder.layers[1]
    layer.train()
    g = torch.Generator().manual_seed(3)
    d = model.config.hidden_size
    mix = torch.randn(d, d, generator=g) / math.sqrt(d)  # correlated features, like hidden states
    head_d = torch.randn(d, generator=g)
    rope = model.rotary_pos_emb(128)

    def batch(n):
        x = torch.randn(128, n, d, generator=g) @ mix
        with torch.no_grad():
            return x, layer.chosen_mask(x).float()

    def accuracy():
        x, target = batch(16)
        with torch.no_grad():
            predicted = layer.mod_predictor(x) > 0
        chosen = target.bool()
        return float((predicted == chosen).float().mean()), float(predicted[chosen].float().mean())

    before, recall_before = accuracy()
    opt = torch.optim.Adam(layer.mod_predictor.parameters(), lr=3e-3)
    for _ in range(300):
        x, _ = batch(8)
        _layer_backward(layer, x, rope, head_d)
        opt.step()
    after, recall_after = accuracy()
    out["predictor"] = {
        "accuracy_before": before,
        "recall_before": recall_before,
        "held_out_accuracy": after,
        "held_out_recall": recall_after,
    }


def main() -> None:
    _setup()
    out: dict = {}
    for check in (
        check_token_counts,
        check_capacity_one,
        check_causal_choice,
        check_aux_loss_path,
        check_predictor_learns,
    ):
        check(out)
    from moe_parallel.runtime.bootstrap import stop_rank

    stop_rank()
    print("MOD_CHECKS " + json.dumps(out))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
