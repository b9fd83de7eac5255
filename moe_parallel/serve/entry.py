"""The rank program of ``moectl generate`` / ``moectl score``: ``python -m moe_parallel.serve.entry
JOB_DIR``.

``JOB_DIR/serve.json``: ``checkpoint``, ``ranks``, ``serve`` (ServeOptions), ``overrides``,
``mode`` ("generate" or "score"), ``prompts`` (token id lists), ``max_new_tokens``, ``eos``,
``trace`` (a path or null), ``logits`` (a path or null: generate's step logits, rank 0),
``vocab_size`` (the tokenizer's). Every rank feeds the same prompts (expert parallelism splits the
experts, not the batch); rank 0 writes ``JOB_DIR/result.json`` and the routing trace.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from moe_parallel.monitor.routing_trace import save_trace

from .apply import apply_serving_options
from .generate import greedy_generate, score
from .model import load_serving_model, serving_config
from .options import ServeOptions, expert_capacity


def run(job_dir: Path) -> dict:
    from moe_parallel.monitor.routing_recorder import RoutingRecorder  # Megatron: after start-up
    from moe_parallel.runtime.bootstrap import start_rank

    spec = json.loads((job_dir / "serve.json").read_text())
    options = ServeOptions(**spec["serve"])
    checkpoint = Path(spec["checkpoint"])
    cfg = serving_config(checkpoint, job_dir, spec["ranks"], options, spec["overrides"])
    info = start_rank(cfg, "cpu")
    vocab = spec["vocab_size"]
    model = load_serving_model(cfg, checkpoint, vocab)
    placement, buffers = apply_serving_options(model, options, checkpoint, spec["ranks"])
    outputs, logits = [], []
    with RoutingRecorder(model) as recorder:
        for prompt in spec["prompts"]:
            if spec["mode"] == "generate":
                new, step_logits = greedy_generate(
                    model,
                    prompt,
                    spec["max_new_tokens"],
                    vocab,
                    cfg.model.seq_length,
                    spec.get("eos"),
                )
                outputs.append({"prompt_ids": prompt, "new_ids": new})
                logits.append(torch.stack(step_logits))
            else:
                outputs.append(score(model, prompt, vocab))
    result = {
        "mode": spec["mode"],
        "gating": options.model_dump(),
        "outputs": outputs,
        "dropped_per_layer": recorder.dropped_per_layer(),
        "routed_per_layer": {layer: int(a.size) for layer, a in recorder.experts().items()},
        "placement": placement,
        "buffering": _buffer_stats(buffers),
    }
    moe = cfg.model.moe
    if options.gating == "static" and moe is not None:
        result["capacity_per_forward"] = [
            expert_capacity(t, moe.top_k, moe.num_experts, options.capacity_factor)
            for t in recorder.forward_tokens
        ]
    if info.rank == 0:
        if spec.get("trace"):
            save_trace(
                spec["trace"],
                recorder.experts(),
                trace_meta(cfg, spec, options, recorder),
                recorder.probs(),
            )
        if spec.get("logits"):
            torch.save(logits, spec["logits"])
        (job_dir / "result.json").write_text(json.dumps(result, indent=1))
    return result


def _buffer_stats(buffers) -> list[list[dict]] | None:
    """Per MoE layer, each rank's buffer counts (every rank buffers its own local experts)."""
    if not buffers:
        return None
    mine = [b.buffer.stats.as_dict() for b in buffers]
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, mine)
    return [[ranks[i] for ranks in every] for i in range(len(buffers))]


def trace_meta(cfg, spec: dict, options: ServeOptions, recorder) -> dict:
    moe = cfg.model.moe
    return {
        "source": f"moectl {spec['mode']}",
        "checkpoint": spec["checkpoint"],
        "num_experts": moe.num_experts if moe else 0,
        "top_k": moe.top_k if moe else 0,
        "gating": options.gating,
        "capacity_factor": options.capacity_factor,
        "forwards": recorder.forward_tokens,
        "ranks": spec["ranks"],
    }


def main(argv: list[str] | None = None) -> int:
    from moe_parallel.train import one_rank

    return one_rank.main(run, "python -m moe_parallel.serve.entry JOB_DIR", argv)


if __name__ == "__main__":
    sys.exit(main())
