"""Warnings every CPU rank would print on every start, about things that are expected there."""

import warnings

_EXPECTED = (
    r".*(Transformer Engine|Apex).* not installed.*",  # CPU ranks never have them
    r".*\.grad attribute of a Tensor that is not a leaf.*",  # Megatron reads it in DDP hooks
    r".*full scope is deprecated.*",
    r".*is deprecated. Please use `torch.distributed.*",  # Megatron's collective names
)


def quiet_expected_warnings() -> None:
    for pattern in _EXPECTED:
        warnings.filterwarnings("ignore", message=pattern)
