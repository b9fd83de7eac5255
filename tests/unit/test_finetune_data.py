"""Instruction finetuning pieces without a model: example readers, packing (loss mask, position
ids, segments, per-example attention mask), the held-out split, expert-dropout masks, config
rules."""

from __future__ import annotations

import json

import pytest
import torch

from moe_parallel.config import load_config
from moe_parallel.data.instructions import Example, is_held_out, iter_examples
from moe_parallel.data.packing import PackedInstructions, block_causal_mask, pack
from moe_parallel.model.finetune_options import keep_mask
from tests.conftest import REPO

FLAN = REPO / "configs" / "tiny" / "flan_moe_tiny.yaml"
ONE_RANK = ["parallel.expert=1", "parallel.data=1"]


def test_pack_masks_prompts_restarts_positions_and_separates_examples():
    # (prompt ids, response ids + EOD=0): 3 + 2, 2 + 3, 4 + 2 -> 4, 4 and 5 positions.
    examples = [([11, 12, 13], [21, 0]), ([31, 32], [41, 42, 0]), ([51, 52, 53, 54], [61, 0])]
    out, counts = pack(examples, seq_length=8, pad=1)
    assert counts["rows"] == 2 and counts["examples"] == 3 and counts["cut_to_fit"] == 0
    assert out.tokens_NS[0].tolist() == [11, 12, 13, 21, 31, 32, 41, 42]
    assert out.labels_NS[0].tolist() == [12, 13, 21, 0, 32, 41, 42, 0]
    # Loss only where the target is a response token or the closing EOD.
    assert out.loss_mask_NS[0].tolist() == [0, 0, 1, 1, 0, 1, 1, 1]
    assert out.position_ids_NS[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert out.segment_ids_NS[0].tolist() == [1, 1, 1, 1, 2, 2, 2, 2]
    assert out.tokens_NS[1, :5].tolist() == [51, 52, 53, 54, 61]
    assert out.loss_mask_NS[1].tolist() == [0, 0, 0, 1, 1, 0, 0, 0]  # padding: no loss
    assert out.segment_ids_NS[1].tolist() == [1] * 5 + [0] * 3
    assert counts["response_tokens"] == 7


def test_too_long_example_keeps_its_response_and_prompt_end():
    out, counts = pack([(list(range(100, 110)), [7, 8, 0])], seq_length=6, pad=1)
    assert counts["cut_to_fit"] == 1
    assert out.tokens_NS[0].tolist() == [106, 107, 108, 109, 7, 8]
    assert out.labels_NS[0].tolist() == [107, 108, 109, 7, 8, 0]
    assert out.loss_mask_NS[0].tolist() == [0, 0, 0, 1, 1, 1]


def test_block_causal_mask_never_crosses_examples():
    mask = block_causal_mask(torch.tensor([1, 1, 2, 2, 2, 0]))[0]  # True = may not attend
    allowed = (~mask).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]


def test_dataset_epochs_are_seeded_permutations_and_samples_carry_the_mask():
    out, _ = pack([([5, 6], [7, 0])] * 5, seq_length=3, pad=1)
    ds = PackedInstructions(out, num_samples=12, seed=3, per_example=True)
    rows = [ds.row(i) for i in range(12)]
    assert sorted(rows[:5]) == list(range(5)) and sorted(rows[5:10]) == list(range(5))
    assert rows == [PackedInstructions(out, 12, 3, True).row(i) for i in range(12)]
    sample = ds[0]
    assert sample["attention_mask"].shape == (1, 3, 3) and sample["tokens"].dtype == torch.int64
    assert "attention_mask" not in PackedInstructions(out, 12, 3, per_example=False)[0]


def test_jsonl_prompt_response_and_messages_forms(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"prompt": "Q: 1+1?", "response": " 2"},
                {
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello."},
                    ]
                },
            ]
        )
        + "\n\n"
    )
    got = list(iter_examples(str(path)))
    assert got == [
        Example("Q: 1+1?", " 2"),
        Example("system: Be brief.\nuser: Hi\nassistant:", " Hello."),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: the last message must be the assistant"):
        list(iter_examples(str(bad)))
    with pytest.raises(FileNotFoundError, match="built-in sets"):
        list(iter_examples(str(tmp_path / "missing.jsonl")))


def test_builtin_arithmetic_set_and_held_out_split_are_stable():
    first = list(iter_examples("arithmetic-qa", 2000))
    assert first == list(iter_examples("arithmetic-qa", 2000))
    assert first[0].prompt.startswith("Question: what is ") and first[0].response.startswith(" ")
    held = [e for e in first if is_held_out(e, 0.05)]
    assert 50 <= len(held) <= 150  # about 5%
    assert [e for e in reversed(first) if is_held_out(e, 0.05)] == held[::-1]  # order-free


def test_expert_dropout_masks_have_the_rate_and_depend_on_token_expert_column():
    keys = torch.arange(4000, dtype=torch.int64) * 2654435761 % (1 << 32)
    experts = torch.zeros(4000, dtype=torch.int64)
    keep = keep_mask(keys, experts, 64, 0, 0.2)
    assert abs(keep.float().mean().item() - 0.8) < 0.01
    assert not torch.equal(keep, keep_mask(keys, experts + 1, 64, 0, 0.2))  # another expert
    # Columns are global: an ETP rank holding columns 32..63 sees the same units.
    assert torch.equal(keep[:, 32:], keep_mask(keys, experts, 32, 32, 0.2))


def test_finetune_config_rules():
    cfg = load_config(FLAN)
    assert cfg.finetune.freeze == ["router"] and cfg.finetune.expert_dropout == 0.2
    with pytest.raises(ValueError, match="parallel.context=2"):
        load_config(FLAN, ["parallel.context=2", "parallel.data=1"])
    with pytest.raises(ValueError, match="finetune.freeze and finetune.expert_dropout need an MoE"):
        load_config(FLAN, ["model.moe=null", *ONE_RANK])
    with pytest.raises(ValueError, match="freeze"):
        load_config(FLAN, ["finetune.freeze=[gate]"])
