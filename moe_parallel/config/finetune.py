"""The ``finetune`` section of a run config: instruction finetuning (Flan-MoE, arXiv 2305.14705).

A run with a ``finetune`` section trains on prompt/response examples instead of the pretraining
corpus: packed into fixed-length sequences, loss on response tokens only, with the paper's MoE
finetuning options (auxiliary losses on or off, frozen routers or experts, expert dropout). It is
the same training entry on every backend; ``moectl finetune`` is ``moectl train`` that insists on
this section. ``data`` still names the run's tokenizer (the base model's: the same ``data``
section as the pretraining run, or ``data.tokenizer``). Nothing here imports torch.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

# Generated on every machine, no download (moe_parallel/data/instructions.py).
BUILTIN_INSTRUCTION_SETS = ("stdlib-docstrings", "arithmetic-qa")


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=False)

    # JSONL files (one {"prompt", "response"} or {"messages": [...]} object per line), directories
    # of them, or the built-in sets "stdlib-docstrings" and "arithmetic-qa".
    sources: list[str] = Field(default_factory=lambda: ["stdlib-docstrings"])
    max_examples: Optional[PositiveInt] = None  # per source, in the source's order
    # Held-out examples, chosen by a hash of the prompt (the same split whatever the order).
    valid_fraction: float = Field(0.05, ge=0, lt=1)
    # "per_example": attention never crosses the examples packed into one sequence (block-
    # diagonal causal mask; Megatron's local attention path). "across_examples": plain causal
    # attention over the packed sequence (position ids still restart per example).
    attention: Literal["per_example", "across_examples"] = "per_example"
    aux_loss: bool = True  # keep model.moe's load-balancing loss while finetuning
    z_loss: bool = True  # keep model.moe's router z-loss while finetuning
    # "router": the gates (router weights); "experts": the routed experts' weights. Frozen
    # parameters get no gradient and are left out of the optimizer.
    freeze: list[Literal["router", "experts"]] = Field(default_factory=list)
    # Dropout on the routed experts' hidden activations (the input of their second linear), at
    # this rate, in training only; masks keyed by token identity (the same in every layout).
    expert_dropout: float = Field(0.0, ge=0, lt=1)


def check_finetune(cfg) -> None:
    """Cross-field rules of the finetune section (called by RunConfig's validator)."""
    ft = cfg.finetune
    if ft is None:
        return
    if cfg.model.moe is None and (ft.freeze or ft.expert_dropout):
        raise ValueError(
            "finetune.freeze and finetune.expert_dropout need an MoE model (model.moe is not set)"
        )
    if len(set(ft.freeze)) != len(ft.freeze):
        raise ValueError(f"finetune.freeze={ft.freeze}: each of 'router', 'experts' at most once")
    if ft.attention == "per_example":
        if cfg.parallel.context > 1:
            raise ValueError(
                f"finetune.attention=per_example with parallel.context={cfg.parallel.context}: "
                "the per-example attention mask is not split for context parallelism; use "
                "parallel.context=1 or finetune.attention=across_examples"
            )
        if cfg.train.fp8 is not None:
            raise ValueError(
                f"finetune.attention=per_example with train.fp8={cfg.train.fp8}: the per-example "
                "mask runs on Megatron's local attention path, without Transformer Engine (no "
                "FP8); use train.fp8=null or finetune.attention=across_examples"
            )
    if not ft.sources:
        raise ValueError(
            "finetune.sources is empty: name a JSONL file or one of "
            f"{list(BUILTIN_INSTRUCTION_SETS)}"
        )
