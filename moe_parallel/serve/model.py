"""A checkpoint of ours, loaded for inference on this rank: the run's config from the
checkpoint's ``meta.json``, a layout of R ranks (expert parallel R, nothing else), the gating of
:class:`ServeOptions`, the weights (``load_weights``: any saved layout reshards), eval mode."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from ..config import RunConfig, load_config
from .options import ServeOptions


def find_checkpoint(path: str | Path) -> Path:
    """A step directory, or the latest checkpoint of a checkpoints or run directory."""
    from ..ckpt.checkpoint import resolve_checkpoint

    return resolve_checkpoint(Path(path)).resolve()


def layout_overrides(ranks: int) -> list[str]:
    """R local ranks = expert parallel R over data parallel R; one sample per rank."""
    return [
        "parallel.tensor=1",
        "parallel.pipeline=1",
        "parallel.virtual_pipeline=null",
        "parallel.context=1",
        f"parallel.expert={ranks}",
        f"parallel.data={ranks}",
        "parallel.sequence_parallel=false",
        "train.micro_batch_size=1",
        f"train.global_batch_size={ranks}",
        "checkpoint.on_layout_change=reset_optimizer",
    ]


def serving_config(
    checkpoint: Path,
    job_dir: Path,
    ranks: int,
    options: ServeOptions,
    overrides: list[str] = (),
    on_cpu: bool = True,
) -> RunConfig:
    """The checkpoint's run config for serving (written to ``job_dir/source_config.yaml``)."""
    from ..ckpt.checkpoint import read_meta

    source = job_dir / "source_config.yaml"
    if not source.is_file():
        source.write_text(dump_config_text(read_meta(checkpoint)["config"]))
    cpu = ["train.device=cpu", "train.precision=fp32"] if on_cpu else []
    moe = [] if _is_dense(source) else options.config_overrides()
    # Multi-token prediction's modules only train the model: generation uses the main head
    # (and Megatron's MTP forward needs labels), so the served model is built without them.
    no_mtp = ["model.mtp_layers=0", "model.mtp_loss_weight=null"]
    return load_config(source, [*layout_overrides(ranks), *cpu, *moe, *no_mtp, *overrides])


def dump_config_text(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


def _is_dense(source: Path) -> bool:
    return not (yaml.safe_load(source.read_text()).get("model") or {}).get("moe")


def load_serving_model(
    cfg: RunConfig, checkpoint: Path, vocab_size: int, on_cpu: bool = True
) -> torch.nn.Module:
    """The model module (Megatron GPTModel) holding the checkpoint's weights, in eval mode.
    ``vocab_size``: the tokenizer's (a config without ``model.vocab_size`` takes it from there)."""
    from moe_parallel.model.build import build_train_objects

    from ..ckpt.checkpoint import load_weights

    objs = build_train_objects(cfg, vocab_size, on_cpu=on_cpu)
    load_weights(checkpoint, objs, cfg)
    model = objs.model[0].module
    model.eval()
    return model
