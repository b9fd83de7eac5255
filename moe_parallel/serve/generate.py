"""Greedy generation and scoring with full forwards (no KV cache: every step runs the whole
sequence again, so step t costs a forward over prompt + t tokens)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def forward_logits(
    model: torch.nn.Module, tokens_BS: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """fp32 logits [B, S, vocab_size] (the padded vocabulary cut off); causal attention."""
    positions_BS = torch.arange(tokens_BS.shape[1]).unsqueeze(0).expand_as(tokens_BS)
    with torch.no_grad():
        logits = model(tokens_BS, positions_BS, None)
    return logits[..., :vocab_size].float()


def greedy_generate(
    model: torch.nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    vocab_size: int,
    max_length: int,
    eos: int | None = None,
) -> tuple[list[int], list[torch.Tensor]]:
    """(new token ids, the logits [vocab_size] each was chosen from). Stops at ``eos``."""
    if not prompt:
        raise ValueError("the prompt is empty: generation needs at least one token")
    if len(prompt) + max_new_tokens > max_length:
        raise ValueError(
            f"prompt of {len(prompt)} tokens + --max-new-tokens {max_new_tokens} "
            f"exceeds the model's seq_length {max_length}"
        )
    tokens = list(prompt)
    new, step_logits = [], []
    for _ in range(max_new_tokens):
        logits_V = forward_logits(model, torch.tensor([tokens]), vocab_size)[0, -1]
        token = int(torch.argmax(logits_V))
        new.append(token)
        step_logits.append(logits_V)
        tokens.append(token)
        if eos is not None and token == eos:
            break
    return new, step_logits


def score(model: torch.nn.Module, tokens: list[int], vocab_size: int) -> dict:
    """Mean next-token loss of ``tokens`` and the number of predicted tokens."""
    if len(tokens) < 2:
        raise ValueError("scoring needs at least 2 tokens")
    logits_SV = forward_logits(model, torch.tensor([tokens]), vocab_size)[0]
    target_S = torch.tensor(tokens[1:])
    loss = F.cross_entropy(logits_SV[:-1], target_S, reduction="sum")
    return {"loss": float(loss) / len(target_S), "tokens": len(target_S)}
