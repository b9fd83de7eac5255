"""``moectl generate RUN_OR_CKPT --prompt TEXT`` and ``moectl score RUN_OR_CKPT FILE``: checks
and tokenization here, the model on R local ranks (``moe_parallel/serve/entry.py``, a job
directory under the runs root with its logs), the text decoded here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .apply import check_placement
from .model import find_checkpoint, serving_config
from .options import split_overrides


def prepare_job(
    src: str,
    mode: str,
    prompts_text: list[str],
    ranks: int,
    overrides: list[str],
    runs: str | None,
    max_new_tokens: int = 0,
    trace: str | None = None,
    stop_at_eos: bool = True,
    logits: str | None = None,
):
    """(job directory, tokenizer): serve.json written, nothing run yet."""
    from cluster import new_run_dir
    from moe_parallel.data.packing import tokenizer_only

    from ..data.tokenizer import Tokenizer

    if ranks < 1:
        raise ValueError(f"--ranks {ranks}: must be >= 1")
    checkpoint = find_checkpoint(src)
    options, rest = split_overrides(overrides)
    job_dir = new_run_dir(Path(runs) if runs else None, f"{mode}")
    cfg = serving_config(checkpoint, job_dir, ranks, options, rest)  # validates before any work
    check_placement(options, checkpoint, cfg, ranks)
    tokenizer = Tokenizer.from_file(tokenizer_only(cfg).tokenizer_path)
    prompts = [tokenizer.encode(text) for text in prompts_text]
    spec = {
        "checkpoint": str(checkpoint),
        "ranks": ranks,
        "serve": options.model_dump(),
        "overrides": rest,
        "mode": mode,
        "prompts": prompts,
        "max_new_tokens": max_new_tokens,
        "eos": tokenizer.eod if stop_at_eos else None,
        "vocab_size": cfg.model.vocab_size or tokenizer.vocab_size,
        "trace": str(Path(trace).resolve()) if trace else None,
        "logits": str(Path(logits).resolve()) if logits else None,
    }
    (job_dir / "serve.json").write_text(json.dumps(spec, indent=1))
    return job_dir, tokenizer


def run_job(job_dir: Path, ranks: int, stream: bool = True) -> dict | None:
    """Rank 0's result.json; None (after saying where the logs are) when a rank failed."""
    from cluster import RunSpec, run_local
    from moe_parallel.runtime.bootstrap import local_rank_preload

    code = run_local(
        RunSpec(
            job_dir,
            ranks,
            [sys.executable, "-m", "moe_parallel.serve.entry", str(job_dir)],
            preload=local_rank_preload(),
        ),
        stream=stream,
    )
    if code != 0:
        print(f"moectl: the serving job failed (exit {code}): see {job_dir}/logs", file=sys.stderr)
        return None
    return json.loads((job_dir / "result.json").read_text())


def generate_command(
    src: str,
    prompt: str,
    max_new_tokens: int,
    ranks: int,
    overrides: list[str],
    runs: str | None = None,
    trace: str | None = None,
    logits: str | None = None,
) -> int:
    job_dir, tokenizer = prepare_job(
        src, "generate", [prompt], ranks, overrides, runs, max_new_tokens, trace, logits=logits
    )
    result = run_job(job_dir, ranks)
    if result is None:
        return 1
    out = result["outputs"][0]
    print(f"prompt tokens: {len(out['prompt_ids'])}, generated: {len(out['new_ids'])}")
    print(prompt + tokenizer.decode(out["new_ids"]))
    _print_gating(result, trace)
    return 0


def score_command(
    src: str,
    prompts_file: str,
    ranks: int,
    overrides: list[str],
    runs: str | None = None,
    trace: str | None = None,
) -> int:
    lines = [line for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{prompts_file}: no prompts (one per line)")
    job_dir, _ = prepare_job(src, "score", lines, ranks, overrides, runs, trace=trace)
    result = run_job(job_dir, ranks)
    if result is None:
        return 1
    with open(job_dir / "scores.jsonl", "w") as f:
        for text, out in zip(lines, result["outputs"]):
            f.write(json.dumps({"text": text, **out}) + "\n")
    total = sum(o["loss"] * o["tokens"] for o in result["outputs"])
    count = sum(o["tokens"] for o in result["outputs"])
    print(
        f"{len(lines)} prompts, {count} predicted tokens, mean loss {total / count:.4f} "
        f"(per prompt: {job_dir / 'scores.jsonl'})"
    )
    _print_gating(result, trace)
    return 0


def _print_gating(result: dict, trace: str | None) -> None:
    gating = result["gating"]
    if result.get("placement"):
        placed = result["placement"]
        print(f"expert placement: {placed['file']} ({placed['method']}, layers {placed['layers']})")
    for index, per_rank in enumerate(result.get("buffering") or []):
        hits = sum(r["hits"] for r in per_rank)
        misses = sum(r["misses"] for r in per_rank)
        moved = sum(r["bytes_moved"] for r in per_rank)
        print(
            f"expert buffer (budget {gating['expert_budget']}), MoE layer {index}: {hits} hits, "
            f"{misses} misses, {moved / 1e6:.2f} MB moved"
        )
    if gating["gating"] == "static":
        dropped = ", ".join(
            f"layer {k}: {v}/{result['routed_per_layer'][k]}"
            for k, v in result["dropped_per_layer"].items()
        )
        print(
            f"static gating (capacity factor {gating['capacity_factor']}): dropped "
            f"token-expert pairs {dropped}"
        )
    if trace:
        print(f"routing trace: {trace}")


METHODS = ("greedy", "anti_correlation")


def placement_command(
    trace_path: str, src: str, ranks: int, method: str, out: str | None = None
) -> int:
    """``moectl placement TRACE RUN_OR_CKPT --ranks R``: expert placement per MoE layer from a
    routing trace, written as the checkpoint's placement.json (or ``--out``)."""
    from moe_parallel.monitor.routing_trace import load_trace

    from .placement import (
        anti_correlation_placement,
        batch_loads,
        contiguous_placement,
        greedy_placement,
        imbalance,
        save_placement,
        write_placement_file,
    )

    if method not in METHODS:
        raise ValueError(f"--method {method}: allowed values are {', '.join(METHODS)}")
    checkpoint = find_checkpoint(src)
    trace = load_trace(trace_path)
    experts = trace.num_experts
    if ranks < 2 or experts % ranks:
        raise ValueError(
            f"--ranks {ranks}: a placement needs 2 or more ranks that divide the "
            f"{experts} experts evenly"
        )
    perms, stats = {}, {}
    for layer in sorted(trace.layers):  # the trace's layers are 1-based layer numbers
        loads_BE = batch_loads(trace.forwards(layer), experts)
        if method == "greedy":
            perm = greedy_placement(loads_BE.mean(0), ranks)
        else:
            perm = anti_correlation_placement(loads_BE, ranks)
        before = imbalance(loads_BE, contiguous_placement(experts), ranks)
        after = imbalance(loads_BE, perm, ranks)
        perms[layer - 1] = perm
        stats[str(layer - 1)] = {"before": before, "after": after}
        print(
            f"layer {layer - 1}: max/mean rank load per batch {before['batch_max_over_mean']:.3f}"
            f" -> {after['batch_max_over_mean']:.3f} (trace totals "
            f"{before['total_max_over_mean']:.3f} -> {after['total_max_over_mean']:.3f}); "
            f"experts by rank {[perm[r * experts // ranks : (r + 1) * experts // ranks] for r in range(ranks)]}"
        )
    meta = {"trace": str(Path(trace_path).resolve()), "layers": stats}
    path = (
        write_placement_file(out, perms, ranks, method, meta)
        if out
        else save_placement(checkpoint, perms, ranks, method, meta)
    )
    print(f"placement ({method}, {ranks} ranks): {path}")
    return 0
