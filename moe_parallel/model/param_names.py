"""Which parameters train, decided by name (``named_parameters()`` of a GPT model chunk).

Shared by the model, which sets ``requires_grad`` (finetune/moe_options.py), and by the memory
planner, which gives gradients and optimizer state only to the parameters that train
(plan/memory.py). Light: no Megatron import.
"""

from __future__ import annotations

from dataclasses import dataclass


def is_router(name: str) -> bool:
    return ".mlp.router." in name


def is_expert(name: str) -> bool:
    return ".mlp.experts." in name  # routed experts (shared experts are .mlp.shared_experts.)


@dataclass(frozen=True)
class Trainable:
    """``train.trainable`` and ``finetune.freeze`` of a config."""

    mode: str = "all"  # "adapters_and_routers" (PESC): only the MoE layers' experts and routers
    freeze: tuple[str, ...] = ()  # "router" and/or "experts"

    @classmethod
    def of(cls, cfg) -> "Trainable":
        freeze = tuple(cfg.finetune.freeze) if cfg.finetune is not None else ()
        return cls(mode=cfg.train.trainable, freeze=freeze)

    def trains(self, name: str) -> bool:
        if self.mode == "adapters_and_routers" and not (is_router(name) or is_expert(name)):
            return False  # model/trainable.py: an adapter MoE layer's experts and router
        if "router" in self.freeze and is_router(name):
            return False
        return not ("experts" in self.freeze and is_expert(name))
