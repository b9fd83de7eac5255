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
"""

from __future__ import annotations

import inspect

import torch
from megatron.core.transformer.moe import router as router_module
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
        # global_aux_loss reduces over DP as well; its scaling is left as Megatron has it.
        if router.calculate_per_token_loss and group is router.tp_cp_group:
            local = given["valid_token_count"]
            local = local if local is not None else given["activation"].shape[0]
            given["valid_token_count"] = local * group.size()
        return original_attach(*call.args, **call.kwargs)

    router_cls.attach_and_log_load_balancing_loss = attach_and_log_load_balancing_loss
    router_module.TopKRouter.apply_z_loss = _apply_z_loss
    _APPLIED = True


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
