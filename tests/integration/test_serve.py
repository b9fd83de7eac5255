"""Serving (#10): greedy generation with dynamic gating equals the plain forward (1 rank, EP2),
static gating drops exactly the tokens its capacity says, routing traces round-trip and equal
the router's own choices."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster import RunSpec, run_local
from tests.conftest import REPO, TEST_DATA, TINY

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
CAPACITY_FACTOR = 0.5
PROMPT = [5, 77, 300, 12, 9, 41]
NEW = 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_cache) -> Path:
    from moe_parallel.launch_run import launch_local, plan_train

    overrides = [
        *TEST_DATA,
        f"data.cache_dir={data_cache}",
        "log.tensorboard=false",
        "train.steps=2",
        "train.warmup_steps=1",
        "checkpoint.interval=2",
    ]
    launch = plan_train(TINY, overrides, str(tmp_path_factory.mktemp("serve") / "runs"), None, None)
    assert launch_local(launch, stream=False) == 0
    return launch.run_dir / "checkpoints" / "step_00000002"


def run_check(checkpoint: Path, job_dir: Path, ranks: int) -> dict:
    job_dir.mkdir(parents=True)
    (job_dir / "check.json").write_text(
        json.dumps(
            {
                "checkpoint": str(checkpoint),
                "ranks": ranks,
                "prompt": PROMPT,
                "max_new_tokens": NEW,
                "capacity_factor": CAPACITY_FACTOR,
                "vocab_size": 512,
            }
        )
    )
    entry = [sys.executable, str(REPO / "tests" / "integration" / "serve_check.py"), str(job_dir)]
    assert run_local(RunSpec(job_dir, ranks, entry), stream=False) == 0, (
        job_dir / "logs" / "rank0.log"
    ).read_text()[-3000:]
    return torch.load(job_dir / "check_result_rank0.pt", weights_only=False)


def dropped_by_capacity(experts_TK: np.ndarray, num_experts: int, top_k: int, cf: float) -> int:
    """Independent count: per expert, routed tokens beyond ceil(T * K / E * CF) are dropped."""
    capacity = math.ceil(len(experts_TK) * top_k / num_experts * cf)
    counts_E = np.bincount(experts_TK.ravel(), minlength=num_experts)
    return int(np.maximum(counts_E - capacity, 0).sum())


def check_serving(out: dict, job_dir: Path, ranks: int) -> None:
    from moe_parallel.monitor.routing_trace import load_trace

    E, K = out["num_experts"], out["top_k"]
    dyn, plain = out["dynamic"], out["plain_logits"]
    # Dynamic gating == the plain forward: same greedy tokens, logits within 1e-5.
    assert dyn["logits"].shape == plain.shape == (NEW, 512)
    diff = (dyn["logits"] - plain).abs().max().item()
    print(f"ranks={ranks}: dynamic vs plain max |logit diff| = {diff:.2e}")
    assert diff < 1e-5
    assert dyn["new"] == plain.argmax(dim=-1).tolist()
    assert all(v == 0 for v in dyn["dropped"].values())

    # The trace round-trips and equals the router's choices recomputed from its inputs.
    trace = load_trace(job_dir / "trace.npz")
    assert trace.meta["forwards"] == [len(PROMPT) + i for i in range(NEW)]
    assert sorted(trace.layers) == sorted(out["independent"])
    for layer, experts_TK in trace.layers.items():
        assert experts_TK.shape == (sum(trace.meta["forwards"]), K)
        np.testing.assert_array_equal(experts_TK, out["independent"][layer])
        # Dynamic = exact counts: this rank's local experts got every rank's tokens for them
        # (every rank feeds the same prompt), no padding, nothing dropped.
        per_rank = E // ranks
        for f, part in enumerate(trace.forwards(layer)):
            counts_E = np.bincount(part.ravel(), minlength=E)
            np.testing.assert_array_equal(dyn["received"][layer][f], ranks * counts_E[:per_rank])
        assert np.all((trace.probs[layer] > 0) & (trace.probs[layer] <= 1))

    # Static gating with capacity factor 0.5: tokens are dropped, logits change, the reported
    # count equals the independent count from the router's choices and the capacity.
    st = out["static"]
    total = 0
    for layer, experts_TK in st["experts"].items():
        start = 0
        for f, tokens in enumerate(st["forwards"]):
            part = experts_TK[start : start + tokens]
            start += tokens
            expected = dropped_by_capacity(part, E, K, CAPACITY_FACTOR)
            assert st["dropped_per_forward"][layer][f] == expected
            total += expected
            capacity = math.ceil(tokens * K / E * CAPACITY_FACTOR)  # padded: exactly C per source
            np.testing.assert_array_equal(
                st["received"][layer][f], np.full(E // ranks, capacity * ranks)
            )
    print(
        f"ranks={ranks}: static CF={CAPACITY_FACTOR} dropped {total} token-expert pairs; "
        f"max |logit diff| vs plain {(st['logits'][0] - plain[0]).abs().max().item():.3f}"
    )
    assert total > 0
    assert (st["logits"][0] - plain[0]).abs().max().item() > 1e-3


@pytest.mark.parametrize("ranks", [1, 2])
def test_generation_gating_and_traces(checkpoint, tmp_path, ranks):
    job_dir = tmp_path / f"check{ranks}"
    check_serving(run_check(checkpoint, job_dir, ranks), job_dir, ranks)


def test_training_routing_trace(train_run):
    """log.routing_trace: each rank's file holds its training forwards' routing; together they
    count exactly the tokens per expert the run logged (moe/tokens_per_expert, all ranks)."""
    from moe_parallel.monitor.routing_trace import load_trace

    run = train_run(
        ["train.steps=2", "train.warmup_steps=1", "checkpoint.interval=2", "log.routing_trace=true"]
    )
    assert run.code == 0, run.log()[-3000:]
    traces = [load_trace(run.run_dir / "routing" / f"rank{r}.npz") for r in (0, 1)]
    for trace in traces:  # 2 steps x 2 micro-batches of 2 x 128 tokens per rank
        assert trace.meta["forwards"] == [256] * 4 and trace.meta["top_k"] == 2
        assert sorted(trace.layers) == [1, 2, 3, 4]
    logged = {}
    for record in run.steps:
        for layer, counts in record["moe/tokens_per_expert"].items():
            logged[int(layer) + 1] = logged.get(int(layer) + 1, 0) + np.array(counts)
    for layer, counts_E in logged.items():
        traced_E = sum(t.tokens_per_expert(layer) for t in traces)
        np.testing.assert_array_equal(traced_E, counts_E)
        assert traced_E.sum() == 2 * 4 * 256 * 2


def test_moectl_generate_and_score(checkpoint, tmp_path, capsys):
    """The commands end to end: EP2 static generation prints the text and the dropped pairs,
    whose per-layer sums equal the independent count over its trace; score prints the loss."""
    from launch.cli import main
    from moe_parallel.monitor.routing_trace import load_trace

    trace_path = tmp_path / "gen.npz"
    run_dir = checkpoint.parents[1]
    assert (
        main(
            [
                "generate",
                str(run_dir),
                "--prompt",
                "def main(",
                "--max-new-tokens",
                "3",
                "--ranks",
                "2",
                "--runs",
                str(tmp_path / "jobs"),
                "--trace",
                str(trace_path),
                "serve.gating=static",
                f"serve.capacity_factor={CAPACITY_FACTOR}",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "def main(" in printed and "generated: 3" in printed and "dropped" in printed
    result = json.loads(next((tmp_path / "jobs").glob("generate-*/result.json")).read_text())
    trace = load_trace(trace_path)
    assert trace.meta["gating"] == "static" and len(trace.meta["forwards"]) == 3
    for layer in trace.layers:
        expected = sum(
            dropped_by_capacity(part, 4, 2, CAPACITY_FACTOR) for part in trace.forwards(layer)
        )
        assert result["dropped_per_layer"][str(layer)] == expected
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("import os\ndef f(x):\n    return x\n")
    assert main(["score", str(checkpoint), str(prompts), "--runs", str(tmp_path / "jobs")]) == 0
    assert "3 prompts" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["generate", str(run_dir)])  # --prompt is required
    assert main(["generate", str(run_dir), "--prompt", "x", "serve.gating=static"]) == 2


def test_placement_and_buffering_keep_generation_exact(checkpoint, tmp_path, capsys):
    """moectl placement from a recorded trace, then generation on 2 EP ranks with a placement
    applied at load and expert buffering: the checkpoint's greedy placement (auto) with budget
    1, a file that moves experts between the ranks with budget 2: the plain path's tokens,
    logits within 1e-5."""
    import shutil

    from launch.cli import main
    from moe_parallel.serve.placement import write_placement_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    jobs = str(tmp_path / "jobs")
    trace = tmp_path / "trace.npz"
    prompt = ["--prompt", "def main(", "--max-new-tokens", "4", "--runs", jobs]
    assert main(["generate", str(ckpt), *prompt, "--trace", str(trace)]) == 0
    assert main(["placement", str(trace), str(ckpt), "--ranks", "2"]) == 0
    printed = capsys.readouterr().out
    greedy = json.loads((ckpt / "placement.json").read_text())
    assert greedy["ranks"] == 2 and sorted(greedy["layers"]) == ["0", "1", "2", "3"]
    for stats in greedy["stats"]["layers"].values():  # never worse than the contiguous layout
        assert (
            stats["after"]["total_max_over_mean"] <= stats["before"]["total_max_over_mean"] + 1e-9
        )
    assert "max/mean rank load per batch" in printed
    moved = tmp_path / "moved.json"  # every layer: experts 3 and 0 swap ranks, 1 and 2 too
    write_placement_file(moved, {i: [3, 2, 1, 0] for i in range(4)}, 2, "test")

    def generate(name, *overrides):
        logits = tmp_path / f"{name}.pt"
        assert (
            main(
                [
                    "generate",
                    str(ckpt),
                    *prompt,
                    "--ranks",
                    "2",
                    "--logits",
                    str(logits),
                    "--trace",
                    str(tmp_path / f"{name}.npz"),
                    *overrides,
                ]
            )
            == 0
        )
        result = json.loads(
            sorted(Path(jobs).glob("generate-*/result.json"), key=lambda p: p.stat().st_mtime)[
                -1
            ].read_text()
        )
        return result, torch.load(logits)[0]

    plain, plain_logits = generate("plain", "serve.placement=none")
    assert plain["placement"] is None and plain["buffering"] is None
    for name, overrides in (
        ("greedy+budget1", ["serve.expert_budget=1"]),
        ("moved+budget2", [f"serve.placement={moved}", "serve.expert_budget=2"]),
    ):
        result, logits = generate(name, *overrides)
        assert result["outputs"][0]["new_ids"] == plain["outputs"][0]["new_ids"], name
        diff = (logits - plain_logits).abs().max().item()
        print(f"{name}: max |logit diff| vs plain {diff:.2e}")
        assert diff < 1e-5, name
        assert result["placement"]["file"] == str(
            moved if "moved" in name else ckpt / "placement.json"
        )
        if name == "moved+budget2":  # applied: the router names physical slots, perm.index(logical)
            from moe_parallel.monitor.routing_trace import load_trace

            before, after = load_trace(trace), load_trace(tmp_path / f"{name}.npz")
            for layer, experts_TK in before.layers.items():
                slots = np.sort(np.array([3, 2, 1, 0])[experts_TK], axis=1)
                np.testing.assert_array_equal(after.layers[layer], slots)
                assert not np.array_equal(after.layers[layer], experts_TK)
        if "budget" in name:
            budget = int(name[-1])
            assert len(result["buffering"]) == 4  # MoE layers
            for per_rank in result["buffering"]:
                assert len(per_rank) == 2
                for stats in per_rank:  # 2 local experts per rank
                    assert 1 <= stats["misses"] and stats["hits"] + stats["misses"] > 0
                    assert stats["evictions"] == max(stats["misses"] - budget, 0)
                    if budget == 2:
                        assert stats["misses"] <= 2  # both local experts stay resident


def test_bad_placement_is_refused_before_any_rank_starts(checkpoint, tmp_path, capsys):
    from launch.cli import main
    from moe_parallel.serve.placement import write_placement_file

    four = write_placement_file(tmp_path / "four.json", {0: [0, 1, 2, 3]}, 4, "test")
    bad = write_placement_file(tmp_path / "bad.json", {0: [0, 0, 1, 2]}, 2, "test")
    args = ["generate", str(checkpoint), "--prompt", "x", "--ranks", "2", "--runs", str(tmp_path)]
    assert main([*args, f"serve.placement={four}"]) == 2
    assert "places experts on 4 ranks but this job has --ranks 2" in capsys.readouterr().err
    assert main([*args, f"serve.placement={bad}"]) == 2
    assert "layer 0 is not a permutation of the model's 4 experts" in capsys.readouterr().err
    assert main([*args, f"serve.placement={tmp_path / 'nope.json'}"]) == 2
    assert "no such file (allowed: auto, none" in capsys.readouterr().err
    assert main([*args, "serve.expert_budget=0"]) == 2
    assert "expert_budget" in capsys.readouterr().err
