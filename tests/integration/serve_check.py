"""A rank program for the serving tests: on the same checkpoint and prompt, the plain forward
(the training config's model, eval mode, one forward over the whole final sequence), greedy
generation with dynamic gating and with static gating (routing recorded), and the router's
choices recomputed independently from its inputs.

    python tests/integration/serve_check.py JOB_DIR

``JOB_DIR/check.json``: checkpoint, ranks, prompt (ids), max_new_tokens, capacity_factor,
vocab_size. Rank 0 writes ``JOB_DIR/check_result.pt`` and the dynamic run's trace
``JOB_DIR/trace.npz``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moe_parallel.runtime.bootstrap import prepare_process, start_rank, stop_rank  # noqa: E402


def independent_choices(model, top_k: int):
    """Hooks that recompute every router's top-k from its input and weight: layer -> [experts_TK]."""
    from megatron.core.transformer.moe.router import TopKRouter

    found, handles = {}, []
    for module in model.modules():
        if isinstance(module, TopKRouter):

            def hook(router, args, found=found):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                logits = x @ router.weight.double().t()
                chosen = torch.topk(logits, top_k, dim=1).indices.sort(dim=1).values
                found.setdefault(router.layer_number, []).append(chosen)

            handles.append(module.register_forward_pre_hook(hook))
    return found, handles


def main(job_dir: Path) -> None:
    from moe_parallel.config import load_config
    from moe_parallel.monitor.routing_recorder import RoutingRecorder
    from moe_parallel.monitor.routing_trace import save_trace
    from moe_parallel.serve.generate import forward_logits, greedy_generate
    from moe_parallel.serve.model import layout_overrides, load_serving_model, serving_config
    from moe_parallel.serve.options import ServeOptions

    spec = json.loads((job_dir / "check.json").read_text())
    ckpt, ranks, prompt, n, vocab = (
        Path(spec["checkpoint"]),
        spec["ranks"],
        spec["prompt"],
        spec["max_new_tokens"],
        spec["vocab_size"],
    )
    dynamic = ServeOptions()
    static = ServeOptions(gating="static", capacity_factor=spec["capacity_factor"])
    cfg = serving_config(ckpt, job_dir, ranks, dynamic)
    info = start_rank(cfg, "cpu")
    out = {}

    # Dynamic gating: per-step full forwards, routing recorded and recomputed independently.
    model = load_serving_model(cfg, ckpt, vocab)
    found, handles = independent_choices(model, cfg.model.moe.top_k)
    with RoutingRecorder(model) as rec:
        new, steps = greedy_generate(model, prompt, n, vocab, cfg.model.seq_length)
    for h in handles:
        h.remove()
    out["dynamic"] = {
        "new": new,
        "logits": torch.stack(steps),
        "dropped": rec.dropped_per_layer(),
        "received": rec.received,
        "forwards": rec.forward_tokens,
    }
    out["independent"] = {k: torch.cat(v).numpy() for k, v in found.items()}
    if info.rank == 0:
        save_trace(
            job_dir / "trace.npz",
            rec.experts(),
            {"num_experts": cfg.model.moe.num_experts, "forwards": rec.forward_tokens},
            rec.probs(),
        )

    # Plain path: the training config's model (no serve overrides), one forward, eval mode.
    plain_cfg = load_config(
        job_dir / "source_config.yaml",
        [*layout_overrides(ranks), "train.device=cpu", "train.precision=fp32"],
    )
    plain = load_serving_model(plain_cfg, ckpt, vocab)
    full = torch.tensor([prompt + new])
    out["plain_logits"] = forward_logits(plain, full, vocab)[0, len(prompt) - 1 : -1]

    # Static gating with a capacity that drops tokens.
    static_cfg = serving_config(ckpt, job_dir, ranks, static)
    model_s = load_serving_model(static_cfg, ckpt, vocab)
    with RoutingRecorder(model_s) as rec_s:
        new_s, steps_s = greedy_generate(model_s, prompt, n, vocab, cfg.model.seq_length)
    out["static"] = {
        "new": new_s,
        "logits": torch.stack(steps_s),
        "experts": rec_s.experts(),
        "dropped_per_forward": dict(rec_s.dropped),
        "received": rec_s.received,
        "forwards": rec_s.forward_tokens,
    }
    out["top_k"], out["num_experts"] = cfg.model.moe.top_k, cfg.model.moe.num_experts
    torch.save(out, job_dir / f"check_result_rank{info.rank}.pt")
    stop_rank()


if __name__ == "__main__":
    prepare_process("cpu")
    main(Path(sys.argv[1]))
