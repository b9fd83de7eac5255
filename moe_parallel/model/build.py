"""Model chunks wrapped for data parallelism, the optimizer and the LR schedule of one rank."""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.transformer_config import TransformerConfig

from moe_parallel.config import RunConfig, uses_transformer_engine
from moe_parallel.config.megatron import ddp_config, optimizer_config, transformer_config
from moe_parallel.model.builder import build_model_chunks
from moe_parallel.model.padded_vocab import mask_padded_vocab
from moe_parallel.model.vocab import padded_vocab_size


@dataclass
class TrainObjects:
    config: TransformerConfig
    model: list[DistributedDataParallel]
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    padded_vocab_size: int  # the embedding's rows: the tokenizer's vocabulary, padded


def build_train_objects(cfg: RunConfig, vocab_size: int, on_cpu: bool) -> TrainObjects:
    """The model chunks (DDP-wrapped), optimizer and LR schedule of this rank.  ``vocab_size`` is
    the tokenizer's (or ``model.vocab_size``); it is padded here, for the config's TP, and the
    padded ids are kept out of the loss and of sampling (model/padded_vocab.py)."""
    real_vocab_size = vocab_size
    vocab_size = padded_vocab_size(vocab_size, cfg.parallel.tensor)
    tconfig = transformer_config(cfg, on_cpu=on_cpu)
    use_transformer_engine = uses_transformer_engine(cfg, "cpu" if on_cpu else "cuda")
    chunks = build_model_chunks(cfg, tconfig, vocab_size, use_transformer_engine)
    mask_padded_vocab(chunks, real_vocab_size)
    if cfg.finetune is not None:  # frozen parameters must be known before DDP and the optimizer
        from moe_parallel.model.finetune_options import apply_finetune_options

        apply_finetune_options(chunks, cfg)
    ddp = ddp_config(cfg)
    model = [
        DistributedDataParallel(
            config=tconfig,
            ddp_config=ddp,
            module=chunk,
            # Gradient buckets split across chunks only for the first chunk (Megatron's rule).
            disable_bucketing=i > 0,
        )
        for i, chunk in enumerate(chunks)
    ]
    optimizer = get_megatron_optimizer(optimizer_config(cfg), model)
    _wire_schedule_hooks(tconfig, model, optimizer)
    return TrainObjects(tconfig, model, optimizer, build_scheduler(cfg, optimizer), vocab_size)


def _wire_schedule_hooks(tconfig, model, optimizer) -> None:
    """What Megatron's training loop sets on the config before calling the schedules."""
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.grad_scale_func = optimizer.scale_loss
    # no_sync / grad_sync hooks only matter when grad reduction overlaps the backward pass;
    # without overlap, finalize_model_grads reduces once after the last micro-batch (setting
    # them anyway makes interleaved schedules start a second reduction).


def build_scheduler(cfg: RunConfig, optimizer: MegatronOptimizer) -> OptimizerParamScheduler:
    t = cfg.train
    decay_steps = t.lr_decay_steps or t.steps
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if t.warmup_steps else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr,
        # The scheduler counts in samples when given sample counts; we count in steps.
        lr_warmup_steps=t.warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=t.lr_decay,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )
