"""``python -m moe_parallel.convert.entry JOB_DIR``: one CPU rank converts, either way.

``JOB_DIR/convert.json`` says what to do:

- ``{"direction": "to_megatron", "hf_dir", "config", "out"}``: build the 1-rank model of
  ``config`` (our run config YAML), set every parameter from the HF tensors, and save it as a
  step-0 checkpoint under ``out`` (fresh optimizer); then load it back into a fresh model and
  require every parameter to be what was set. Being an ordinary checkpoint, it loads under any
  layout (``checkpoint.init_from``).
- ``{"direction": "to_hf", "checkpoint", "config", "arch", "out"}``: load the checkpoint's
  weights into the 1-rank model of ``config`` and write config.json + model.safetensors.

A refused conversion (missing or misshapen tensor, ...) writes ``{"error": ...}`` to
``JOB_DIR/convert_report.json`` and exits 1; success writes what was done there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml

from .core import ConvertError

REPORT = "convert_report.json"


def _config(path_or_text: str, is_text: bool = False, precision: str | None = None):
    """The run config on one CPU rank with the local spec (its parameter names are the rules')."""
    from moe_parallel.train.one_rank import ONE_RANK, WEIGHTS_ONLY

    from ..config import config_from_dict

    raw = yaml.safe_load(path_or_text if is_text else Path(path_or_text).read_text())
    overrides = [*ONE_RANK, *WEIGHTS_ONLY, "train.device=cpu"]
    if precision:  # the checkpoint's dtype, when the run's differs (a run casts on load)
        overrides.append(f"train.precision={precision}")
    if (raw.get("model") or {}).get("moe"):
        overrides.append("model.moe.grouped_gemm=false")
    return config_from_dict(raw, overrides)


def _vocab(cfg) -> int:
    from ..model.vocab import model_vocab_size

    return model_vocab_size(cfg)


# Router buffers that are weights of the HF model (DeepSeek-V3's e_score_correction_bias):
# saved in our checkpoints, converted like parameters.
CONVERTED_BUFFERS = (".router.expert_bias",)


def converted_tensors(objs) -> dict[str, torch.Tensor]:
    """The 1-rank model's parameters and the buffers that are weights (the expert bias)."""
    from moe_parallel.train.one_rank import parameters

    module = objs.model[0].module
    buffers = {n: b for n, b in module.named_buffers() if n.endswith(CONVERTED_BUFFERS)}
    return {**parameters(objs), **buffers}


class SkippingWeights:
    """HF weights without the tensors ``skip(name)`` leaves out (logged once, counted)."""

    def __init__(self, weights, skip) -> None:
        self.weights = weights
        self.skipped = sorted(n for n in weights.names() if skip(n))

    def names(self) -> set[str]:
        return self.weights.names() - set(self.skipped)

    def get(self, name: str, wanted_by: str) -> torch.Tensor:
        return self.weights.get(name, wanted_by)


def _build(cfg):
    from moe_parallel.model.build import build_train_objects
    from moe_parallel.train.one_rank import start

    start(cfg)
    return build_train_objects(cfg, _vocab(cfg), on_cpu=True)


def to_megatron(spec: dict) -> dict:
    from moe_parallel.model.build import build_train_objects

    from ..ckpt import optimizer_state
    from ..ckpt.checkpoint import Progress, load_weights, save_checkpoint
    from . import architecture_for
    from .core import megatron_state
    from .hf_files import DequantisedWeights, HFWeights, block_size, read_config

    hf_dir = Path(spec["hf_dir"])
    arch = architecture_for(read_config(hf_dir), str(hf_dir))
    cfg = _config(spec["config"], precision=spec.get("precision"))
    objs = _build(cfg)
    params = converted_tensors(objs)
    targets = {name: tuple(p.shape) for name, p in params.items()}
    weights = HFWeights(hf_dir)
    block = block_size(read_config(hf_dir))
    if block is not None:
        weights = DequantisedWeights(weights, block)
        print(f"dequantising block-wise FP8 weights (blocks of {block})", flush=True)
    skip = getattr(arch, "skipped_hf_tensor", None)  # optional: architecture modules' docstring
    if skip is not None:
        weights = SkippingWeights(weights, lambda name: skip(name, cfg.model))
        if weights.skipped:
            print(
                f"not converted: {len(weights.skipped)} HF tensors with no place in our model "
                f"({weights.skipped[0]} ... {weights.skipped[-1]})",
                flush=True,
            )
    values = megatron_state(arch.rules(cfg.model), cfg.model, weights, targets)
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value)
    optimizer_state.reset_from_model(objs.optimizer)  # main weights follow, moments start at 0
    out = save_checkpoint(Path(spec["out"]), objs, Progress(), cfg)
    # Read back what was written, as a run's checkpoint.init_from will.
    del objs, params
    fresh = build_train_objects(cfg, _vocab(cfg), on_cpu=True)
    load_weights(out, fresh, cfg)
    loaded = converted_tensors(fresh)
    wrong = [
        n for n, v in values.items() if not torch.equal(loaded[n].detach(), v.to(loaded[n].dtype))
    ]
    if wrong:
        raise RuntimeError(f"{len(wrong)} parameters differ after loading {out} back: {wrong[:3]}")
    return {
        "checkpoint": str(out),
        "architecture": arch.HF_CLASS,
        "parameters": len(values),
        "numel": sum(v.numel() for v in values.values()),
    }


def to_hf(spec: dict) -> dict:
    from ..ckpt.checkpoint import load_weights
    from . import architecture_by_name
    from .core import DTYPES_TO_HF, hf_state
    from .hf_files import write_hf

    cfg = _config(spec["config"], is_text=spec.get("config_is_text", False))
    arch = architecture_by_name(spec["arch"])
    objs = _build(cfg)
    load_weights(Path(spec["checkpoint"]), objs, cfg)
    vocab = _vocab(cfg)
    params = converted_tensors(objs)
    skipped = getattr(arch, "skipped_parameters", lambda model: ())(cfg.model)
    if skipped:
        dropped = sorted(n for n in params if n.startswith(skipped))
        print(
            f"not converted: {len(dropped)} of our parameters under {', '.join(skipped)} "
            f"({arch.HF_CLASS} has no place for them)",
            flush=True,
        )
        params = {n: v for n, v in params.items() if n not in dropped}
    tensors = hf_state(arch.rules(cfg.model), cfg.model, params, vocab)
    model = cfg.model.model_copy(update={"vocab_size": vocab})
    config = {**arch.hf_config(model, DTYPES_TO_HF[cfg.train.precision]), **spec.get("keep", {})}
    write_hf(Path(spec["out"]), config, tensors)
    return {"hf_dir": spec["out"], "architecture": arch.HF_CLASS, "tensors": len(tensors)}


def run(job_dir: Path) -> int:
    spec = json.loads((job_dir / "convert.json").read_text())
    report = job_dir / REPORT
    try:
        done = to_megatron(spec) if spec["direction"] == "to_megatron" else to_hf(spec)
    except ConvertError as exc:
        report.write_text(json.dumps({"error": str(exc)}))
        print(f"conversion refused: {exc}", file=sys.stderr, flush=True)
        return 1
    report.write_text(json.dumps(done, indent=1))
    print(f"converted: {json.dumps(done)}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from moe_parallel.runtime.bootstrap import prepare_process, stop_rank

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m moe_parallel.convert.entry JOB_DIR", file=sys.stderr)
        return 2
    prepare_process("cpu")  # conversion runs on CPU, whatever the machine has
    try:
        return run(Path(argv[0]))
    finally:
        stop_rank()


if __name__ == "__main__":
    sys.exit(main())
