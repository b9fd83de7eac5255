"""One training step: Megatron's forward-backward schedule over the micro-batches of a global
batch, the optimizer step, and the step's numbers reduced across ranks.

Shapes: B micro-batch size, S sequence length. Losses are sums over tokens with their token
counts, so the global loss is sum / count over the whole global batch for every layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from moe_parallel.model.build import TrainObjects

from ..model.routers import noise
from ..monitor import heartbeat


@dataclass
class StepResult:
    lm_loss: float  # mean per-token LM loss over the global batch
    num_tokens: int
    grad_norm: float | None
    lr: float
    skipped: bool  # the optimizer refused the update (inf/nan grads)


def forward_step(data_iterator: Iterator[dict], model):
    batch = next(data_iterator)
    noise.set_samples(batch.get("sample_ids"))
    # attention_mask: only instruction finetuning's per-example packing has one (else causal).
    # loss_mask: Megatron reads it only for multi-token prediction's losses (model.mtp_layers).
    output_BS = model(
        batch["tokens"],
        batch["position_ids"],
        batch.get("attention_mask"),
        labels=batch["labels"],
        loss_mask=batch["loss_mask"],
    )
    return output_BS, partial(loss_sum, batch["loss_mask"])


def loss_sum(loss_mask_BS: torch.Tensor, losses_BS: torch.Tensor):
    mask = loss_mask_BS.reshape(-1).float()
    loss = torch.sum(losses_BS.float().reshape(-1) * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss.detach(), mask.sum()])
    return loss, num_tokens, {"lm_loss": report}


def train_step(
    objs: TrainObjects,
    data_iterators: list[Iterator[dict]],
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
) -> StepResult:
    for chunk in objs.model:
        chunk.zero_grad_buffer()
    objs.optimizer.zero_grad()
    heartbeat.set_phase("forward-backward")
    reports = _run_schedule(
        objs, data_iterators, num_microbatches, seq_length, micro_batch_size, forward_only=False
    )
    heartbeat.set_phase("optimizer")
    objs.scheduler.step(increment=1)  # step s (1-based) trains at lr(s)
    ok, grad_norm, _ = objs.optimizer.step()
    loss_sum, tokens = global_loss(reports)
    return StepResult(
        lm_loss=loss_sum / max(tokens, 1.0),
        num_tokens=int(tokens),
        grad_norm=None if grad_norm is None else float(grad_norm),
        lr=objs.optimizer.param_groups[0]["lr"],
        skipped=not ok,
    )


def _run_schedule(
    objs, data_iterators, num_microbatches, seq_length, micro_batch_size, forward_only: bool
) -> list[dict]:
    """Megatron's schedule for this layout (no pipelining, 1F1B or interleaved)."""
    return schedule_function()(
        forward_step_func=forward_step,
        data_iterator=data_iterators if len(data_iterators) > 1 else data_iterators[0],
        model=objs.model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def schedule_function():
    """Megatron's forward-backward schedule for this rank's process groups: no pipelining,
    1F1B (``forward_backward_pipelining_without_interleaving``), or interleaved 1F1B over the
    virtual pipeline stages (``forward_backward_pipelining_with_interleaving``)."""
    return get_forward_backward_func()


def global_loss(reports: list[dict]) -> tuple[float, float]:
    """(sum of token losses, token count) over the global batch, known on every rank.

    Only the last pipeline stage has losses; tensor-parallel ranks hold identical copies, so
    the first TP rank of each last-stage data/context-parallel rank contributes."""
    totals = torch.zeros(2, dtype=torch.float64)
    contributes = (
        parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        and parallel_state.get_tensor_model_parallel_rank() == 0
    )
    if contributes:
        for report in reports:
            totals += report["lm_loss"].detach().to("cpu", torch.float64)
    totals = totals.to(_comm_device())
    torch.distributed.all_reduce(totals)
    return float(totals[0]), float(totals[1])


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if _on_gpu() else torch.device("cpu")


def _on_gpu() -> bool:
    from moe_parallel.runtime import cpu_adapter as device

    return not device.is_active() and torch.cuda.is_available()


@torch.no_grad()
def evaluate_loss(
    objs: TrainObjects,
    data_iterators: list[Iterator[dict]],
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
) -> float:
    """Mean per-token LM loss of one global batch, forward only (weights untouched)."""
    for chunk in objs.model:
        chunk.eval()
    try:
        reports = _run_schedule(
            objs, data_iterators, num_microbatches, seq_length, micro_batch_size, forward_only=True
        )
    finally:
        for chunk in objs.model:
            chunk.train()
    loss_sum, tokens = global_loss(reports)
    return loss_sum / max(tokens, 1.0)
