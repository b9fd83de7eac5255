"""The serving options that act on a loaded model: expert placement, then expert buffering."""

from __future__ import annotations

from pathlib import Path

import torch

from .buffering import BufferedSequentialMLP, buffer_moe_layer
from .options import ServeOptions
from .placement import PLACEMENT_FILE, load_placement_file, moe_layers, place_experts


def placement_source(options: ServeOptions, checkpoint: Path) -> Path | None:
    """The placement.json to apply, or None; a named file that does not exist is an error."""
    if options.placement == "none":
        return None
    if options.placement == "auto":
        found = checkpoint / PLACEMENT_FILE
        return found if found.is_file() else None
    path = Path(options.placement)
    if not path.is_file():
        raise ValueError(
            f"serve.placement={options.placement}: no such file (allowed: auto, "
            "none, or the path of a placement.json)"
        )
    return path


def check_placement(options: ServeOptions, checkpoint: Path, cfg, ranks: int) -> Path | None:
    """Before any rank starts: the placement to apply fits this model and --ranks."""
    source = placement_source(options, checkpoint)
    if source is None:
        return None
    data = load_placement_file(source)
    if data["ranks"] != ranks:
        raise ValueError(
            f"{source} places experts on {data['ranks']} ranks but this job has "
            f"--ranks {ranks}; serve on {data['ranks']} ranks or pass "
            "serve.placement=none"
        )
    moe = cfg.model.moe
    if moe is None:
        raise ValueError(f"{source}: a placement for a dense model (no model.moe)")
    for key, perm in data["layers"].items():
        if not 0 <= int(key) < cfg.model.num_layers:
            raise ValueError(
                f"{source}: layer {key} is outside the model's layers 0..{cfg.model.num_layers - 1}"
            )
        if sorted(perm) != list(range(moe.num_experts)):
            raise ValueError(
                f"{source}: layer {key} is not a permutation of the model's "
                f"{moe.num_experts} experts: {perm}"
            )
    return source


def apply_serving_options(
    model: torch.nn.Module, options: ServeOptions, checkpoint: Path, ranks: int
) -> tuple[dict | None, list[BufferedSequentialMLP]]:
    """(the placement applied or None, the buffered expert modules by layer order)."""
    applied = None
    source = placement_source(options, checkpoint)
    if source is not None:
        data = load_placement_file(source)
        layers = {int(k): v for k, v in data["layers"].items()}
        place_experts(model, layers)
        applied = {"file": str(source), "method": data["method"], "layers": sorted(layers)}
    buffers = []
    if options.expert_budget is not None:
        device = next(model.parameters()).device  # the slots live where the model computes
        for _, layer in sorted(moe_layers(model).items()):
            buffers.append(buffer_moe_layer(layer, options.expert_budget, device))
    return applied, buffers
