"""Corrections to Megatron-core 0.16.1 that apply on every device (CPU and GPU alike).

Router losses under tensor (+sequence) or context parallelism with per-token loss averaging.
With ``calculate_per_token_loss`` Megatron multiplies each router loss by the number of tokens
*of this rank* before handing it to backward, and finalize_model_grads later divides all
gradients by the global token count. Under sequence parallelism each of the ``tp x cp`` ranks
holds 1/(tp x cp) of a micro-batch's tokens, and the per-rank loss terms already add up to the
whole micro-batch's loss (load balancing: P_i is divided by the global T; z-loss: the coefficient
is divided by tp x cp). Multiplying by the *local* count therefore scales the router-loss
gradients by 1/(tp x cp): measured here, a TP=2 run drifted from the TP=1 run by 2e-4 in grad
norm from the first step, and matched it exactly with router losses off. The right multiplier is
the micro-batch's token count over the tp x cp group, which is what these wrappers pass.

The global load-balancing loss (``global_aux_loss``, arXiv 2501.11873) has the same defect over
its wider group, tp x dp x cp: its token counts are summed over the data-parallel ranks' current
micro-batches, and the ranks' loss terms add up to the loss of those micro-batches together, so
its multiplier is the token count over that group too. With the local count its gradient shrank
by 1/(tp x dp x cp) (measured: the expert loads of a DP=2 run left those of the one rank that
holds both ranks' micro-batches at step 2).

Expert parameters under expert tensor parallelism without expert parallelism. Megatron-core
0.16.1 marks an expert linear's parameters expert-parallel (``allreduce = False``: gradients
reduced over the expert-data-parallel group, stepped by the expert optimizer) only when EP > 1
(``tensor_parallel/layers.py``). With EP = 1 and an expert tensor-parallel size other than TP the
expert-data-parallel group is not the dense one: with TP=1, ETP=2 on two ranks the two ranks hold
different halves of each expert, yet their gradients were averaged over the dense data-parallel
group (measured: the experts' squared gradient norms 0.2-6.5% off one rank's at the first step,
the loss 2.5e-4 off at step 2); with TP=2, ETP=1 the experts' gradients from the two sequence
halves were never summed. Upstream fixed the predicate to
``is_expert and (EP > 1 or ETP != TP)`` (NVIDIA/Megatron-LM pull request 5916);
:func:`mark_expert_parameters` applies it to a built model.

The sharded state of a pipeline stage that holds multi-token prediction but not the embedding
(the last stage under PP). ``GPTModel.sharded_state_dict(metadata=None)`` ties the stage's copy
of the embedding with ``metadata['dp_cp_group']`` although only its parent filled in the default
metadata (for its own copy of the argument), so the call raised a TypeError; Megatron's training
loop always passes metadata. :func:`sharded_state_dict` passes the default metadata, as the
parent would have made it.
"""

from __future__ import annotations

import inspect

import torch
from megatron.core.transformer.moe import router as router_module
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    save_to_aux_losses_tracker,
    z_loss_func,
)

_APPLIED = False


def apply() -> None:
    global _APPLIED
    if _APPLIED:
        return
    router_cls = router_module.TopKRouter
    original_attach = router_cls.attach_and_log_load_balancing_loss

    signature = inspect.signature(original_attach)

    def attach_and_log_load_balancing_loss(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        given = call.arguments
        router, group = given["self"], given["reduce_group"]
        # tp x cp for aux_loss and seq_aux_loss, tp x dp x cp for global_aux_loss.
        if router.calculate_per_token_loss:
            local = given["valid_token_count"]
            local = local if local is not None else given["activation"].shape[0]
            given["valid_token_count"] = local * group.size()
        return original_attach(*call.args, **call.kwargs)

    router_cls.attach_and_log_load_balancing_loss = attach_and_log_load_balancing_loss
    router_module.TopKRouter.apply_z_loss = _apply_z_loss
    _mla_without_transformer_engine()
    _APPLIED = True


def _mla_without_transformer_engine() -> None:
    """Without Transformer Engine, Megatron puts a MagicMock in its place, and MLA's module takes
    the mock's import for TE being there (``HAVE_TE = True``); its ``isinstance(linear_proj,
    TELinear)`` then raises. Tell it the truth."""
    import importlib.util

    from megatron.core.transformer import multi_latent_attention

    if importlib.util.find_spec("transformer_engine") is None:
        multi_latent_attention.HAVE_TE = False


def _apply_z_loss(self, logits, padding_mask=None):
    """Megatron's TopKRouter.apply_z_loss with the per-token multiplier taken over tp x cp."""
    coeff = self.config.moe_z_loss_coeff
    if coeff is None or not self.training or not torch.is_grad_enabled():
        return logits
    group_size = self.tp_cp_group.size()
    z_loss = z_loss_func(logits, coeff / group_size, padding_mask=padding_mask)
    if self.calculate_per_token_loss:
        local = (~padding_mask).sum() if padding_mask is not None else logits.shape[0]
        logits = MoEAuxLossAutoScaler.apply(logits, z_loss * local * group_size)
    else:
        logits = MoEAuxLossAutoScaler.apply(logits, z_loss)
    num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
    save_to_aux_losses_tracker(
        "z_loss", z_loss / (coeff / group_size), self.layer_number, num_layers
    )
    return logits


def mark_expert_parameters(chunks: list[torch.nn.Module], config) -> None:
    """Every parameter of an MoE layer's routed experts is expert-parallel when EP > 1 or the
    expert tensor size differs from TP (see the module docstring). Must run before the chunks
    are wrapped for data parallelism, which reads ``allreduce``."""
    ep, etp = config.expert_model_parallel_size, config.expert_tensor_parallel_size
    if ep == 1 and etp == config.tensor_model_parallel_size:
        return  # the expert-data-parallel group is the dense one: nothing to correct
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, MoELayer):
                for param in module.experts.parameters():
                    param.allreduce = False


def sharded_state_dict(module: torch.nn.Module) -> dict:
    """``module.sharded_state_dict()`` with Megatron's default metadata passed explicitly (see
    the module docstring: a stage with MTP and no embedding needs it)."""
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    return module.sharded_state_dict(metadata=ensure_metadata_has_dp_cp_group(None))
