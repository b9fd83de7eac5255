"""Rank program of tests/parallel/test_plan_memory.py: what one rank really allocates.

``python tests/parallel/plan_memory_probe.py OUT_DIR CASES_JSON`` on every rank (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT set). CASES_JSON is a list of {"name", "config", "overrides"}, all with
the same world size; for each case the rank builds the model, DDP and optimizer exactly as
training does (moe_parallel.model.build), runs one training step on synthetic tokens and writes
``OUT_DIR/<name>.rank<R>.json`` with:

- ``param_bytes``: the DDP parameter buffers (distributed optimizer: the parameters are views into
  them) or, without one, the parameters' own storages; ``grad_bytes``: the DDP gradient buffers;
- ``optimizer_bytes``: every storage reachable from the optimizer's parameter groups and state
  (fp32 main copies, exp_avg, exp_avg_sq) that is not a parameter or gradient buffer, counted once;
- ``saved_peak_bytes``: activation memory measured with saved-tensor hooks: every tensor autograd
  saves for backward is recorded (by storage, counted once while any saved reference to it is
  alive, storages of parameters excluded); the peak of the live total over the whole 1F1B
  schedule of the step is reported.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


class SavedTensorMeter:
    """Live bytes of the storages autograd holds for backward, and their peak."""

    def __init__(self, excluded_ptrs: set[int]):
        self.excluded = excluded_ptrs
        self.live: dict[int, list] = {}  # storage ptr -> [nbytes, references]
        self.total = 0
        self.peak = 0

    def pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.excluded or storage.nbytes() == 0:
            return _Saved(tensor, None, self)
        entry = self.live.get(ptr)
        if entry is None:
            entry = self.live[ptr] = [storage.nbytes(), 0]
            self.total += entry[0]
            self.peak = max(self.peak, self.total)
        entry[1] += 1
        return _Saved(tensor, ptr, self)

    @staticmethod
    def unpack(saved: "_Saved") -> torch.Tensor:
        return saved.tensor

    def release(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.total -= entry[0]
            del self.live[ptr]


class _Saved:
    __slots__ = ("tensor", "ptr", "meter")

    def __init__(self, tensor, ptr, meter):
        self.tensor, self.ptr, self.meter = tensor, ptr, meter

    def __del__(self):
        if self.ptr is not None:
            self.meter.release(self.ptr)


def _synthetic_dataset(cfg, vocab: int, samples: int) -> list[dict]:
    gen = torch.Generator().manual_seed(cfg.train.seed)
    S = cfg.model.seq_length
    data = []
    for _ in range(samples):
        ids = torch.randint(0, vocab, (S + 1,), generator=gen)
        data.append(
            {
                "tokens": ids[:-1].clone(),
                "labels": ids[1:].clone(),
                "loss_mask": torch.ones(S, dtype=torch.float32),
                "position_ids": torch.arange(S),
            }
        )
    return data


def _storage_bytes(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel() > 0:
            s = t.untyped_storage()
            out[s.data_ptr()] = s.nbytes()
    return out


def measure(case: dict, out_dir: Path) -> None:
    from megatron.core import parallel_state

    from moe_parallel.config import load_config
    from moe_parallel.model.build import build_train_objects
    from moe_parallel.train.batches import StepBatches
    from moe_parallel.train.step import train_step

    cfg = load_config(case["config"], case["overrides"])
    from moe_parallel.runtime.bootstrap import start_rank

    info = start_rank(cfg, "cpu")
    vocab = cfg.model.vocab_size
    objs = build_train_objects(cfg, vocab, on_cpu=True)

    buffers = [b for chunk in objs.model for b in (*chunk.buffers, *chunk.expert_parallel_buffers)]
    param_storages: dict[int, int] = {}
    for b in buffers:
        if b.param_data is not None:
            param_storages.update(_storage_bytes([b.param_data]))
    params = [p for chunk in objs.model for p in chunk.module.parameters()]
    param_storages.update(_storage_bytes(params))
    grad_storages = _storage_bytes([b.grad_data for b in buffers])

    dataset = _synthetic_dataset(cfg, cfg.model.vocab_size, cfg.train.global_batch_size)
    batches = StepBatches(
        dataset,
        cfg.train.global_batch_size,
        cfg.train.micro_batch_size,
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(),
        torch.device("cpu"),
    )
    meter = SavedTensorMeter(set(param_storages) | set(grad_storages))
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        result = train_step(
            objs,
            batches.iterators(0, len(objs.model)),
            batches.num_microbatches,
            cfg.model.seq_length,
            cfg.train.micro_batch_size,
        )
    assert meter.total == 0, f"saved tensors still alive after the step: {meter.total} bytes"

    opt_tensors = []
    for opt in getattr(objs.optimizer, "chained_optimizers", [objs.optimizer]):
        for group in opt.optimizer.param_groups:
            opt_tensors.extend(group["params"])
        for state in opt.optimizer.state.values():
            opt_tensors.extend(
                v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0
            )
    opt_storages = {
        ptr: n
        for ptr, n in _storage_bytes(opt_tensors).items()
        if ptr not in param_storages and ptr not in grad_storages
    }
    record = {
        "rank": info.rank,
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "dp_rank": parallel_state.get_data_parallel_rank(),
        "expert_dp_rank": parallel_state.get_expert_data_parallel_rank(),
        "param_bytes": sum(param_storages.values()),
        "grad_bytes": sum(grad_storages.values()),
        "optimizer_bytes": sum(opt_storages.values()),
        "saved_peak_bytes": meter.peak,
        "loss": result.lm_loss,
    }
    (out_dir / f"{case['name']}.rank{info.rank}.json").write_text(json.dumps(record))
    torch.distributed.barrier()
    parallel_state.destroy_model_parallel()
    # Megatron's loss trackers are process-wide and sized by the first model that logs (its
    # layer count): the next case may have more layers (multi-token prediction's).
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    get_moe_layer_wise_logging_tracker().clear()
    MTPLossLoggingHelper.tracker.clear()


def main() -> None:
    from moe_parallel.runtime.bootstrap import prepare_process

    prepare_process("cpu")  # one intra-op thread (OMP_NUM_THREADS unset)
    out_dir, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    for case in cases:
        measure(case, out_dir)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
