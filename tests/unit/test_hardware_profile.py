"""Hardware profiles: the shipped ones load, bad ones are refused with the field named, and a
layout the profile's node cannot hold is refused."""

from __future__ import annotations

import pytest
import yaml

from moe_parallel.config import load_config
from moe_parallel.plan.hardware import (
    HARDWARE_DIR,
    ProfileError,
    load_profile,
    parse_overlap,
    profile_from_dict,
)
from moe_parallel.plan.layouts import search_layouts
from moe_parallel.plan.report import plan_report
from tests.conftest import REPO

TINY = REPO / "configs" / "tiny" / "moe_tiny.yaml"


def shipped(name: str) -> dict:
    return yaml.safe_load((HARDWARE_DIR / name).read_text())


def test_shipped_profiles_load_with_their_datasheet_figures():
    h100, h200 = (
        load_profile(HARDWARE_DIR / "h100_sxm.yaml"),
        load_profile(HARDWARE_DIR / "h200_sxm.yaml"),
    )
    assert h100.peak_flops == h200.peak_flops == 989e12
    assert h100.memory_bandwidth == pytest.approx(0.9 * 3.35e12, rel=0.01)
    assert h200.memory_bandwidth == pytest.approx(0.9 * 4.8e12, rel=0.01)
    assert (h100.memory_gib, h200.memory_gib) == (80.0, 141.0)
    assert h100.link("all_to_all", 8, 1) is h100.intra_node["all_to_all"]
    assert h100.link("all_to_all", 8, 2) is h100.inter_node["all_to_all"]
    assert h100.sources and h200.sources
    round_trip = profile_from_dict(yaml.safe_load(h200.as_yaml()))
    assert round_trip == h200


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("memory_bandwidth"), "field 'memory_bandwidth' is missing"),
        (lambda d: d.pop("collective_host_s"), "field 'collective_host_s' is missing (a profile"),
        (lambda d: d.update(peak_flops=0), "peak_flops=0; allowed: a number > 0"),
        (lambda d: d.update(gpus_per_node=-8), "gpus_per_node=-8; allowed: a number > 0"),
        (lambda d: d.update(layer_host_s=-1.0), "layer_host_s=-1.0; allowed: a number >= 0"),
        (lambda d: d["gemm"].__setitem__(1, [1e9, 0]), "gemm[1][1]=0; allowed: a number > 0"),
        (lambda d: d["intra_node"].pop("all_to_all"), "field 'intra_node.all_to_all' is missing"),
        (
            lambda d: d["inter_node"]["p2p"].update(bus_bandwidth=0),
            "inter_node.p2p.bus_bandwidth=0; allowed: a number > 0",
        ),
        (lambda d: d.update(attention="paged"), "attention='paged'; allowed: ['flash', 'unfused']"),
        (lambda d: d.update(tflops=1), "unknown field 'tflops'"),
    ],
)
def test_bad_profiles_name_the_field(edit, message):
    data = shipped("h100_sxm.yaml")
    edit(data)
    with pytest.raises(ProfileError) as info:
        profile_from_dict(data, "p.yaml")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_profile_file_is_named(tmp_path):
    with pytest.raises(ProfileError, match="nope.yaml' does not exist"):
        load_profile(tmp_path / "nope.yaml")


def test_a_tp_group_larger_than_the_node_is_refused():
    data = shipped("h100_sxm.yaml")
    data["gpus_per_node"] = 1
    hw = profile_from_dict(data)
    cfg = load_config(TINY, ["model.vocab_size=512"])
    result = search_layouts(cfg, gpus=8, gpu_memory_gib=80, hw=hw)
    assert result.fitting and all(c.layout.tensor == 1 for c in result.fitting)
    assert any("parallel.tensor=N does not fit in one node" in r for r in result.rejected)
    tp2 = load_config(
        TINY,
        [
            "model.vocab_size=512",
            "parallel.tensor=2",
            "parallel.expert=1",
            "parallel.data=1",
            "parallel.sequence_parallel=true",
        ],
    )
    with pytest.raises(ProfileError, match=r"parallel.tensor=2 does not fit .*gpus_per_node=1"):
        plan_report(tp2, None, None, 80, 10, False, hw)


def test_overlap_flag_names_the_allowed_kinds():
    assert parse_overlap("grad_reduce,expert_comm").expert_comm
    with pytest.raises(ProfileError, match=r"'ep'; allowed: \['grad_reduce'"):
        parse_overlap("ep")
