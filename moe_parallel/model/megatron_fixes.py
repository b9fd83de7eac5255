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

    def attach_and_log_load_balancing_loss(self, activation, aux_loss_coeff, aux_loss,
                                           aux_loss_name, reduce_group, reduce_group_has_dp=False,
                                           valid_token_count=None):
        # global_aux_loss reduces over DP as well; its scaling is left as Megatron has it.
        if self.calculate_per_token_loss and reduce_group is self.tp_cp_group:
            local = valid_token_count if valid_token_count is not None else activation.shape[0]
            valid_token_count = local * reduce_group.size()
        return original_attach(self, activation, aux_loss_coeff, aux_loss, aux_loss_name,
                               reduce_group, reduce_group_has_dp, valid_token_count)

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
    save_to_aux_losses_tracker("z_loss", z_loss / (coeff / group_size), self.layer_number,
                               num_layers)
    return logits


# ---------------------------------------------------------------------------------------------
# DistributedOptimizer state without Transformer Engine / Apex (torch Adam): measured on CPU
# ranks (shared/notes/megatron-dist-checkpoint-on-cpu.md), and the same code runs on GPU nodes
# that lack TE/Apex.
#  - load_state_dict gives every param ONE shared `step` tensor; torch Adam increments it once
#    per param, so the step after a resume uses a wrong bias correction. Give each its own.
#  - _set_main_param_and_optimizer_states copies into views of leaf tensors outside no_grad,
#    and would overwrite the restored step with a 0 (see set_states).
#  - A fresh optimizer (no step taken yet) has no `step` entries and state_dict() asserts.
# ---------------------------------------------------------------------------------------------
def apply_optimizer_fixes() -> None:
    from megatron.core.optimizer import distrib_optimizer as do_module

    DO = do_module.DistributedOptimizer
    if getattr(DO, "_moe_parallel_fixed", False):
        return
    original_set = DO._set_main_param_and_optimizer_states
    original_load = DO.load_state_dict
    original_state_dict = DO.state_dict

    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        # The per-param "step" in the dp_reshardable bucket state is not restored by
        # dist_checkpointing (it comes back as the loading template's 0); the true step is in
        # the param groups, which load_state_dict has already put into `state`. Keep that one.
        tensors = {k: v for k, v in tensors.items() if k != "step"}
        if "step" in state:
            tensors["step"] = state["step"]
        with torch.no_grad():
            original_set(self, model_param, tensors)

    def load_state_dict(self, state_dict):
        original_load(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    def state_dict(self):
        if not do_module.HAVE_APEX_OR_TE and self.optimizer.state is not None:
            for group in self.optimizer.param_groups:
                for param in group["params"]:
                    state = self.optimizer.state[param]
                    if "step" not in state:
                        if self.init_state_fn is not None and "exp_avg" not in state:
                            self.init_state_fn(self.optimizer, self.config)
                        state.setdefault("step", torch.tensor(0.0))
        return original_state_dict(self)

    DO._set_main_param_and_optimizer_states = set_states
    DO.load_state_dict = load_state_dict
    DO.state_dict = state_dict
    DO._moe_parallel_fixed = True
