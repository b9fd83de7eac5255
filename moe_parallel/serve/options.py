"""Serving options (``serve.*`` on the command line) and what they change in the run config.

- ``serve.gating=dynamic`` (default): Megatron's dropless alltoall dispatcher: every expert gets
  exactly the tokens routed to it in this batch (counts exchanged first), no padding, no dropping
  ("dynamic gating", arXiv 2303.06182). The model's ``capacity_factor`` is switched off.
- ``serve.gating=static`` + ``serve.capacity_factor=CF``: every expert processes exactly
  ``C = ceil(CF * T * top_k / E)`` token slots per forward (T = the rank's tokens); missing slots
  are padded, tokens beyond C are dropped (Megatron's ``moe_expert_capacity_factor`` +
  ``moe_pad_expert_input_to_capacity``, drop policy "probs": an expert keeps its C most probable
  tokens). A dropped token's expert contributes nothing (its other experts and the residual stay).
- ``serve.expert_budget=N``: expert buffering: each rank keeps its experts in host memory and N
  slots in a separate arena (device memory on a GPU), with the paper's cache policy
  (``serve/buffering.py``); outputs are unchanged, hits/misses/bytes are reported.
- ``serve.placement``: ``auto`` (default) applies the checkpoint's ``placement.json`` when there
  is one (made by ``moectl placement``), ``none`` ignores it, a path applies that file. Outputs
  are unchanged; which rank computes which expert changes.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ServeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gating: Literal["dynamic", "static"] = "dynamic"
    capacity_factor: Optional[float] = Field(None, gt=0)
    expert_budget: Optional[int] = Field(None, ge=1)
    placement: Optional[str] = "auto"  # auto | none | PATH to a placement.json

    @field_validator("placement")
    @classmethod
    def _placement(cls, value: Optional[str]) -> str:
        return "none" if value is None else value  # serve.placement=none reads as null

    @model_validator(mode="after")
    def _capacity(self) -> "ServeOptions":
        if self.gating == "static" and self.capacity_factor is None:
            raise ValueError("serve.gating=static needs serve.capacity_factor (e.g. 1.0)")
        if self.gating == "dynamic" and self.capacity_factor is not None:
            raise ValueError(
                f"serve.capacity_factor={self.capacity_factor} is for "
                "serve.gating=static; dynamic gating has no capacity"
            )
        return self

    def config_overrides(self) -> list[str]:
        """Run-config overrides that give the model this gating."""
        if self.gating == "dynamic":
            return ["model.moe.capacity_factor=null", "model.moe.pad_to_capacity=false"]
        return [
            f"model.moe.capacity_factor={self.capacity_factor}",
            "model.moe.pad_to_capacity=true",
            "model.moe.dispatcher=alltoall",
        ]


def split_overrides(overrides: list[str]) -> tuple[ServeOptions, list[str]]:
    """(serve options from the ``serve.*`` overrides, the other overrides)."""
    serve, rest = {}, []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r}: overrides are key=value")
        if key.startswith("serve."):
            serve[key[len("serve.") :]] = None if value in ("null", "none", "") else value
        else:
            rest.append(item)
    try:
        return ServeOptions(**serve), rest
    except Exception as exc:  # pydantic's message names the field and the allowed values
        raise ValueError(f"serve options {serve}: {exc}") from None


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Megatron's ``get_capacity(num_tokens * top_k, E, CF)``: slots per expert per forward."""
    return math.ceil(num_tokens * top_k / num_experts * capacity_factor)
