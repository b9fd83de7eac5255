"""BTX plans: the shipped plans validate, bad plans are refused with the field named, and the
stage configs are derived as documented."""

from __future__ import annotations

import pytest

from moe_parallel.btx.plan import PlanError, branch_stage, check_plan, load_plan
from moe_parallel.btx.state import BtxState, Stage, read_state, write_state
from moe_parallel.config import load_config
from moe_parallel.data.corpus import iter_documents
from tests.conftest import REPO

TINY = REPO / "configs" / "btx" / "tiny.yaml"
FULL = REPO / "configs" / "btx" / "llama2_7b_math_code_wiki.yaml"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the plans name their configs relative to the repository


def test_tiny_plan_validates_and_makes_four_experts():
    seed, moe = check_plan(load_plan(TINY))
    assert seed.model.moe is None and moe.model.moe.num_experts == 4
    assert load_plan(TINY).expert_names == ["seed", "code", "prose", "arithmetic"]


def test_full_scale_plan_validates_at_paper_shape():
    plan = load_plan(FULL, ["seed.checkpoint=null", "tokenizer=null"])  # not on this machine
    seed, moe = check_plan(plan)
    assert (seed.model.num_layers, seed.model.hidden_size, seed.model.ffn_hidden_size) == (
        32,
        4096,
        11008,
    )
    assert (moe.model.moe.num_experts, moe.model.moe.top_k) == (4, 2)
    assert seed.world_size == 16 and moe.world_size == 64


def test_branch_config_starts_from_the_seed_with_its_own_data_and_steps():
    plan = load_plan(FULL, ["seed.checkpoint=null", "tokenizer=null"])
    cfg = load_config(plan.seed.config, branch_stage(plan, "math", "/p/math", "/t.json", "/seed"))
    assert cfg.train.steps == 48000 and cfg.checkpoint.init_from == "/seed"
    assert cfg.data.prefixes == ["/p/math"] and cfg.data.tokenizer == "/t.json"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["mix.seed_expert=false"],
            "num_experts=4 but the plan makes 3 experts (code, prose, arithmetic)",
        ),
        (["domains.extra={sources: [arithmetic]}"], "the plan makes 5 experts"),
        (["seed.config=configs/tiny/moe_tiny.yaml"], "must be dense"),
        (["mix.moe_config=configs/tiny/dense_tiny.yaml"], "needs a model.moe section"),
        (
            ["seed.overrides=[model.ffn_hidden_size=96]"],
            "expert_ffn_hidden_size=128 must equal the seed's model.ffn_hidden_size=96",
        ),
        (["seed.overrides=[model.num_layers=2]"], "differs from the seed in model.num_layers"),
        (
            ["seed.checkpoint=/nonexistent"],
            "seed.checkpoint=/nonexistent is not a checkpoint directory",
        ),
        (["mix.on_failed_branch=proceed"], "without a branch the MoE has 3 experts"),
        (["mix.on_failed_branch=sometimes"], "on_failed_branch"),
        (["branches.overrides=[train.stepz=3]"], "train.stepz"),
        (["domains.code.overrides=[train.warmup_steps=100]"], "train.warmup_steps=100"),
        (["domainz={}"], "domainz"),
        (["domains={}"], "domains"),
        (["domains={'a b': {sources: [arithmetic]}}"], "must be letters, digits"),
        (["tokenizer=/nonexistent.json"], "tokenizer=/nonexistent.json does not exist"),
        (["mix.experts=[code,prose]"], "the plan makes 3 experts (seed, code, prose)"),
        (["mix.experts=[code,maths]"], "['maths'] are not domains of the plan"),
        (["mix.experts=[code,code,prose]"], "names a domain twice"),
        (["mix.top_k=5"], "mix.top_k=5 is larger than the 4 experts"),
        (["mix.router_init_std=0"], "router_init_std"),
    ],
)
def test_bad_plan_is_refused_naming_the_field(overrides, message):
    with pytest.raises(PlanError) as err:
        check_plan(load_plan(TINY, overrides))
    assert message in str(err.value)


def test_state_round_trips_atomically(tmp_path):
    state = BtxState(plan="p.yaml", backend="local")
    state.stage("branch:code").attempts = 2
    state.stages["mix"] = Stage(state="done", checkpoint="/c")
    write_state(tmp_path, state)
    again = read_state(tmp_path)
    assert again.stages["branch:code"].attempts == 2 and again.stages["mix"].checkpoint == "/c"
    assert not list(tmp_path.glob("*.tmp"))


def test_demo_domains_are_deterministic_and_distinct():
    arithmetic = list(iter_documents(["arithmetic"], 5000))
    assert arithmetic == list(iter_documents(["arithmetic"], 5000))
    a, op, b, eq, result = arithmetic[0].splitlines()[0].split()
    assert (
        eq == "="
        and int(result) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    )
    docs = next(iter(iter_documents(["python-stdlib-docs"], 2000)))
    code = next(iter(iter_documents(["python-stdlib-code"], 2000)))
    assert "def " in code or "import " in code
    assert "def " not in docs[:200] and docs != code


def test_a_subset_of_branches_can_become_the_experts():
    plan = load_plan(
        TINY,
        [
            "mix.experts=[prose,code,arithmetic]",
            "mix.top_k=3",
            "mix.moe_config=configs/tiny/btx_moe_tiny.yaml",
        ],
    )
    assert plan.expert_names == ["seed", "prose", "code", "arithmetic"]
    _, moe = check_plan(plan)
    assert moe.model.moe.top_k == 3
