"""serve.* options: parsing, validation, what they set in the run config, Megatron's capacity."""

import math

import pytest
from megatron.core.transformer.moe.moe_utils import get_capacity

from moe_parallel.serve.options import ServeOptions, expert_capacity, split_overrides


def test_split_and_config_overrides():
    opts, rest = split_overrides(
        ["serve.gating=static", "serve.capacity_factor=0.5", "train.seed=3"]
    )
    assert opts == ServeOptions(gating="static", capacity_factor=0.5) and rest == ["train.seed=3"]
    assert "model.moe.pad_to_capacity=true" in opts.config_overrides()
    assert "model.moe.capacity_factor=0.5" in opts.config_overrides()
    assert "model.moe.capacity_factor=null" in ServeOptions().config_overrides()


def test_refuses_inconsistent_options():
    with pytest.raises(ValueError, match="capacity_factor"):
        split_overrides(["serve.gating=static"])
    with pytest.raises(ValueError, match="dynamic"):
        split_overrides(["serve.capacity_factor=1.0"])
    with pytest.raises(ValueError, match="gating"):
        split_overrides(["serve.gating=sometimes"])


@pytest.mark.parametrize("tokens,k,e,cf", [(6, 2, 4, 0.5), (9, 2, 4, 1.0), (128, 1, 8, 1.25)])
def test_capacity_is_megatrons(tokens, k, e, cf):
    assert (
        expert_capacity(tokens, k, e, cf)
        == get_capacity(tokens * k, e, cf)
        == math.ceil(tokens * k / e * cf)
    )
