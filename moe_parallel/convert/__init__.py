"""Hugging Face <-> Megatron checkpoints (``moectl convert``).

One small module per architecture (``mixtral.py``, ``qwen2_moe.py``, ``qwen3_moe.py``,
``phimoe.py``, ``olmoe.py``, ``deepseek_v2.py``, ``deepseek_v3.py``) with four functions: ``model_section(hf_config) -> dict`` (our ``model.*`` fields), ``limits(ModelConfig) -> list``
(why our model cannot be written as this architecture; empty when it can),
``hf_config(ModelConfig, dtype) -> dict`` (config.json) and ``rules(ModelConfig) -> list[Rule]``
(which HF tensors make each Megatron parameter, see core.py); and ``CONFIG_CLASS`` (transformers'
config class, whose defaults fill the fields config.json leaves out) and ``REQUIRED`` (the fields
config.json must give); optionally ``skipped_hf_tensor(name, ModelConfig) -> bool`` (HF tensors
that are not converted, e.g. DeepSeek-V3's multi-token prediction module) and
``skipped_parameters(ModelConfig) -> tuple`` (prefixes of our parameters not written to HF),
each skip logged by the job. Adding an architecture is one more such module and one more line in
``ARCHITECTURES``.
"""

from __future__ import annotations

from types import ModuleType

from . import deepseek_v2, deepseek_v3, mixtral, olmoe, phimoe, qwen2_moe, qwen3_moe
from .core import ConvertError

ARCHITECTURES: dict[str, ModuleType] = {
    m.HF_CLASS: m for m in (mixtral, qwen2_moe, phimoe, qwen3_moe, olmoe, deepseek_v3, deepseek_v2)
}
# Names accepted by --arch for the Megatron -> HF direction.
ARCH_NAMES: dict[str, ModuleType] = {m.MODEL_TYPE: m for m in ARCHITECTURES.values()}


def architecture_for(hf_config: dict, source: str = "the checkpoint") -> ModuleType:
    """The module for an HF config's ``architectures``; a clear error for any other."""
    names = hf_config.get("architectures") or []
    supported = ", ".join(ARCHITECTURES)
    if not names:
        raise ConvertError(
            f"{source}: config.json names no architecture ('architectures' is "
            f"missing); supported: {supported}"
        )
    found = [ARCHITECTURES[n] for n in names if n in ARCHITECTURES]
    if not found:
        raise ConvertError(
            f"{source}: architecture {', '.join(names)} is not supported by "
            f"moectl convert; supported: {supported}"
        )
    return found[0]


def architecture_by_name(name: str) -> ModuleType:
    if name in ARCH_NAMES:
        return ARCH_NAMES[name]
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    raise ConvertError(
        f"--arch {name}: not supported; supported: "
        f"{', '.join(ARCH_NAMES)} ({', '.join(ARCHITECTURES)})"
    )


__all__ = [
    "ARCHITECTURES",
    "ARCH_NAMES",
    "ConvertError",
    "architecture_by_name",
    "architecture_for",
]
