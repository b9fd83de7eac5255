"""Megatron distributed checkpoints (torch_dist) of a whole training state, written atomically.

Layout of a checkpoint root::

    step_00000020/            one finished checkpoint: Megatron's sharded files, meta.json and
                              manifest.json (written last; see manifest.py)
    step_00000040.partial/    a save in progress (or interrupted): never read, removed on the next save
    step_00000020.replaced/   the previous step-20 checkpoint while a re-save of step 20 swaps
                              the new one in (put back by the next save if the swap was cut short)
    latest                    the name of the newest finished checkpoint (replaced atomically)

A save goes to ``<name>.partial``; only after every rank has written its shards does rank 0
write meta.json and the manifest (hashes of every stored chunk), rename the directory into place
and then move ``latest``. Loading verifies the manifest first and names any damaged tensor.

A crash in any window of this leaves no half checkpoint that reads as one (only a finished
directory, with its manifest, under a ``step_N`` name counts) and ``latest`` either naming a
finished checkpoint or, for one window, naming a missing one: a re-save of an existing step
(resumed from an older checkpoint) renames the old directory away and then the new one in, and
a crash between the two renames leaves neither under ``step_N``. ``latest_checkpoint`` then falls
back to the newest checkpoint that passes verification, with a warning naming what it skipped,
and the next save renames ``step_N.replaced`` back (``recover_interrupted_swap``).

What is saved: model chunks, the optimizer state in model space (fp32 main weights and Adam
moments under each parameter's own key and sharding, see optimizer_state.py, plus the Adam step),
LR scheduler, per-rank RNG states, the data position and the config. Everything but the RNG
states reshards: a checkpoint loads under any other valid layout (TP, PP, EP, DP, distributed
optimizer on or off). RNG states are per rank and restored only under the same layout.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint.api import CheckpointException

from moe_parallel.model import megatron_fixes
from moe_parallel.model.build import TrainObjects
from moe_parallel.runtime import faults

from ..config import RunConfig, dump_config, model_fingerprint
from . import optimizer_state
from .files import replace_file, write_durable
from .manifest import (
    MANIFEST,
    CheckpointCorrupt,
    build_manifest,
    remove_writer_hashes,
    require_intact,
    verify,
    write_manifest,
)

LATEST = "latest"
META = "meta.json"
PARTIAL = ".partial"
REPLACED = ".replaced"
_STEP_DIR = re.compile(r"step_\d+")  # a checkpoint's name; .partial and .replaced never match

log = logging.getLogger(__name__)


@dataclass
class Progress:
    step: int = 0
    consumed_samples: int = 0


class CheckpointMismatch(RuntimeError):
    """A checkpoint that does not fit the model being trained."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``latest`` names (None without a ``latest``). When it names a directory
    that is missing or has no manifest (a re-save cut short between its renames, a directory
    deleted by hand), the newest finished checkpoint that passes verification instead, with a
    warning naming what was skipped; CheckpointMismatch when none does."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if (path / MANIFEST).is_file():
        return path
    state = f"has no {MANIFEST}" if path.is_dir() else "is missing"
    skipped = [f"{pointer} names {path.name}, which {state}"]
    for candidate in reversed(finished_checkpoints(root)):
        problems = verify(candidate)
        if not problems:
            log.warning(
                "checkpoint fallback: %s; using %s, the newest verified checkpoint",
                "; ".join(skipped),
                candidate.name,
            )
            return candidate
        skipped.append(f"{candidate.name} fails verification ({problems[0]})")
    raise CheckpointMismatch(f"no verified checkpoint under {root}: " + "; ".join(skipped))


def resolve_checkpoint(target: Path, step: int | None = None) -> Path:
    """The one reading of "a checkpoint" on the command line and in ``checkpoint.init_from``: a
    step directory as it is; a run directory or a checkpoints directory: its newest finished
    checkpoint, or the one of ``step``. Raises FileNotFoundError saying what was there."""
    path = Path(target)
    if (path / META).is_file():
        if not (path / MANIFEST).is_file():  # meta.json is written first, the manifest last
            raise FileNotFoundError(
                f"{path} is not a finished checkpoint: it has no {MANIFEST} (a save interrupted "
                "before it was published)"
            )
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if step is not None:
        found = root / step_name(step)
        if not (found / MANIFEST).is_file():
            have = ", ".join(p.name for p in finished_checkpoints(root)) or "none"
            raise FileNotFoundError(
                f"no finished checkpoint for step {step} in {root} (have: {have})"
            )
        return found
    latest = latest_checkpoint(root) if root.is_dir() else None
    if latest is None:
        raise FileNotFoundError(f"no finished checkpoint under {path}")
    return latest


class SaveFailed(RuntimeError):
    """A save that did not complete; raised on every rank together. ``latest`` is untouched."""


def save_checkpoint(
    root: Path, objs: TrainObjects, progress: Progress, cfg: RunConfig, protect: Path | None = None
) -> Path:
    """Save atomically, move ``latest``, then apply retention (never deleting ``protect``, the
    checkpoint this run resumed from, nor the one just written).

    Every failure (a rank's write, rank 0's bookkeeping) raises ``SaveFailed`` on all ranks at
    the same point, so a caller can record it and train on without a hung collective.
    """
    final = root / step_name(progress.step)
    partial = final.with_name(final.name + PARTIAL)
    rank = torch.distributed.get_rank()
    on_rank0_then_agree(
        lambda: prepare_partial(root, partial),
        SaveFailed,
        "preparing the checkpoint failed on rank 0: ",
    )
    state = sharded_state(objs, progress, with_rng=True, is_loading=False)
    try:
        faults.during_save(progress.step, rank)
        dist_checkpointing.save(state, str(partial))
    except (Exception, CheckpointException) as exc:  # DCP raises the latter (a BaseException)
        # torch.distributed.checkpoint reports a failed write to every rank.
        raise SaveFailed(f"writing {partial} failed (seen on rank {rank}): {exc}") from exc
    finally:
        faults.end_of_save()
    faults.after_save_writes(progress.step, rank)
    torch.distributed.barrier()
    on_rank0_then_agree(
        lambda: publish(root, partial, final, progress, cfg, keep={final, protect}),
        SaveFailed,
        "publishing the checkpoint failed on rank 0: ",
    )
    return final


def prepare_partial(root: Path, partial: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    recover_interrupted_swap(root)
    for stale in root.glob(f"*{PARTIAL}"):
        shutil.rmtree(stale)  # interrupted earlier saves
    partial.mkdir()


def recover_interrupted_swap(root: Path) -> None:
    """Undo a re-save cut short (rank 0, before the next save). ``step_N.replaced`` is the
    previous step-N checkpoint, renamed away to make room for the new one: with no ``step_N``
    (the crash came between the renames) it goes back into place, so that ``latest`` names it
    again; beside a finished ``step_N`` (the crash came after the second rename) it is deleted."""
    for old in root.glob(f"step_*{REPLACED}"):
        final = old.with_name(old.name[: -len(REPLACED)])
        if (final / MANIFEST).is_file():
            shutil.rmtree(old)
            log.warning("removed %s, left behind by a finished re-save of %s", old, final.name)
        elif not final.exists():
            os.replace(old, final)
            log.warning("put %s back as %s (a re-save interrupted between its renames)", old, final)
        else:
            raise ValueError(
                f"{final} has no {MANIFEST} and {old.name} is beside it; "
                "inspect both and remove the one that is not a checkpoint"
            )


def publish(
    root: Path, partial: Path, final: Path, progress: Progress, cfg: RunConfig, keep: set
) -> None:
    faults.publishing(progress.step)
    _write_meta(partial, progress, cfg)
    faults.publish_point("before_manifest", progress.step)
    # The manifest is written last: a directory with one is complete, and its hashes were
    # computed from the bytes as they landed on disk.
    write_manifest(
        partial,
        build_manifest(
            partial,
            {
                "step": progress.step,
                "layout": layout_of(cfg),
                "model_fingerprint": model_fingerprint(cfg),
            },
        ),
    )
    remove_writer_hashes(partial)
    if final.exists():  # re-saving a step (resumed from an older checkpoint): swap, then delete
        # Two renames (no atomic swap of directories); recover_interrupted_swap mends a crash
        # between them.
        old = final.with_name(final.name + REPLACED)
        os.replace(final, old)
        faults.publish_point("between_renames", progress.step)
        os.replace(partial, final)
        shutil.rmtree(old)
    else:
        os.replace(partial, final)
    faults.publish_point("before_latest", progress.step)
    replace_file(root / LATEST, final.name)
    if cfg.checkpoint.keep_last is not None:
        prune(root, cfg.checkpoint.keep_last, keep=keep, keep_every=cfg.checkpoint.keep_every)


def on_rank0_then_agree(action, error: type[Exception], context: str = "") -> None:
    """Run ``action`` on rank 0; every rank learns whether it worked and raises together
    (a rank-0-only exception would leave the others waiting in the next collective)."""
    message = [None]
    if torch.distributed.get_rank() == 0:
        try:
            action()
        except (OSError, ValueError, CheckpointCorrupt) as exc:
            message[0] = f"{context}{exc}"
    torch.distributed.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise error(message[0])


def discard_partial(root: Path) -> None:
    """After a failed save: remove what it left (rank 0)."""
    for stale in root.glob(f"*{PARTIAL}"):
        shutil.rmtree(stale, ignore_errors=False)


def finished_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    found = [
        p
        for p in root.glob("step_*")
        if _STEP_DIR.fullmatch(p.name) and p.is_dir() and (p / MANIFEST).is_file()
    ]
    return sorted(found, key=lambda p: p.name)


def prune(root: Path, keep_last: int, keep: set, keep_every: int | None = None) -> list[Path]:
    """Delete finished checkpoints older than the newest ``keep_last``, except those in ``keep``
    and, with ``keep_every``, those whose step is a multiple of it (long-term snapshots)."""
    milestone = lambda p: keep_every is not None and int(p.name.split("_")[1]) % keep_every == 0  # noqa: E731
    doomed = [
        p for p in finished_checkpoints(root)[:-keep_last] if p not in keep and not milestone(p)
    ]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def load_checkpoint(path: Path, objs: TrainObjects, cfg: RunConfig) -> Progress:
    # Rank 0 checks every hash; all ranks refuse together, naming the damaged tensors.
    on_rank0_then_agree(lambda: require_intact(path), CheckpointCorrupt)
    meta = read_meta(path)
    check_compatible(meta, cfg, path)
    same_layout = meta["layout"] == layout_of(cfg)
    with_optimizer = cfg.checkpoint.on_layout_change == "reshard" or same_layout
    state = sharded_state(
        objs, Progress(), with_rng=same_layout, is_loading=True, with_optimizer=with_optimizer
    )
    loaded = dist_checkpointing.load(state, str(path))
    for i, chunk in enumerate(objs.model):
        chunk.module.load_state_dict(loaded[_model_key(i, len(objs.model))])
    if with_optimizer:
        optimizer_state.restore(
            optimizer_state.slots(objs.optimizer), loaded["optimizer_state"], loaded["adam_step"]
        )
    else:  # the optimizer's fp32 main weights must follow the loaded ones (moments start at 0)
        optimizer_state.reset_from_model(objs.optimizer)
    if same_layout:
        set_rng_states(loaded["rng_state"])
    objs.scheduler.load_state_dict(loaded["scheduler"])
    return Progress(**loaded["progress"])


def load_weights(path: Path, objs: TrainObjects, cfg: RunConfig) -> None:
    """Only the model's weights (what Megatron's --finetune loads): the optimizer starts fresh
    from them, the LR schedule and the step count from zero. Used by checkpoint.init_from."""
    on_rank0_then_agree(lambda: require_intact(path), CheckpointCorrupt)
    check_compatible(read_meta(path), cfg, path, weights_only=True)
    state = {
        _model_key(i, len(objs.model)): megatron_fixes.sharded_state_dict(chunk.module)
        for i, chunk in enumerate(objs.model)
    }
    loaded = dist_checkpointing.load(state, str(path))
    for i, chunk in enumerate(objs.model):
        chunk.module.load_state_dict(loaded[_model_key(i, len(objs.model))])
    optimizer_state.reset_from_model(objs.optimizer)


def read_meta(path: Path) -> dict:
    meta_path = path / META
    if not meta_path.is_file():
        raise CheckpointMismatch(f"{path} is not a finished checkpoint: {META} is missing")
    return json.loads(meta_path.read_text())


# What fixes the set and shapes of a model's tensors (not its training-only settings).
_STRUCTURE = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "normalization",
    "activation",
    "tie_embeddings",
    "add_bias_linear",
    "add_qkv_bias",
    "position_embedding",
    "vocab_size",
)
_MOE_STRUCTURE = (
    "num_experts",
    "expert_ffn_hidden_size",
    "shared_expert_ffn_hidden_size",
    "layer_freq",
    "router",
    "shared_expert_gate",
    "expert_kind",
    "adapter_dim",
)
# Fields added after checkpoints were written: a checkpoint without one has the default.
_DEFAULTS = {
    "attention": "standard",
    "attention_output_bias": False,
    "output_layer_bias": False,
    "qk_norm": False,
    "qk_norm_scope": "head",
    "latent_attention": None,
    "mtp_layers": 0,
    "shared_expert_gate": False,
    "router": "topk",
    "expert_kind": "ffn",
    "adapter_dim": None,
    "first_dense_layers": 0,
    "expert_bias": False,
}
_STRUCTURE = (
    *_STRUCTURE,
    "attention",
    "attention_output_bias",
    "output_layer_bias",
    "qk_norm",
    "qk_norm_scope",
    "latent_attention",
)
_MOE_STRUCTURE = (*_MOE_STRUCTURE, "first_dense_layers", "expert_bias")


def check_compatible(meta: dict, cfg: RunConfig, path: Path, weights_only: bool = False) -> None:
    """Refuse a checkpoint of another model, naming the fields that differ. ``weights_only``
    (serving, init_from): a model without multi-token prediction may take the weights of one
    with it (the MTP modules are left out); a resume needs the same modules."""
    saved, ours = meta["model"], cfg.model.model_dump(mode="json")
    diffs = [
        f"model.{k}: checkpoint {saved.get(k, _DEFAULTS.get(k))!r}, config {ours.get(k)!r}"
        for k in _STRUCTURE
        if saved.get(k, _DEFAULTS.get(k)) != ours.get(k)
    ]
    saved_mtp = saved.get("mtp_layers", _DEFAULTS["mtp_layers"])
    if saved_mtp != ours["mtp_layers"] and not (weights_only and ours["mtp_layers"] == 0):
        diffs.append(f"model.mtp_layers: checkpoint {saved_mtp!r}, config {ours['mtp_layers']!r}")
    saved_moe, our_moe = saved.get("moe") or {}, ours.get("moe") or {}
    if bool(saved_moe) != bool(our_moe):
        diffs.append(
            f"model.moe: checkpoint {'MoE' if saved_moe else 'dense'}, "
            f"config {'MoE' if our_moe else 'dense'}"
        )
    elif saved_moe:
        diffs += [
            f"model.moe.{k}: checkpoint {saved_moe.get(k, _DEFAULTS.get(k))!r}, "
            f"config {our_moe.get(k)!r}"
            for k in _MOE_STRUCTURE
            if saved_moe.get(k, _DEFAULTS.get(k)) != our_moe.get(k)
        ]
    saved_mod, our_mod = saved.get("mod") or {}, ours.get("mod") or {}  # Mixture-of-Depths
    diffs += [
        f"model.mod.{k}: checkpoint {saved_mod.get(k)!r}, config {our_mod.get(k)!r}"
        for k in ("layer_freq", "causal", "predictor_hidden_size")
        if saved_mod.get(k) != our_mod.get(k)
    ]
    if diffs:
        raise CheckpointMismatch(f"{path} holds a different model:\n  " + "\n  ".join(diffs))


def sharded_state(
    objs: TrainObjects,
    progress: Progress,
    with_rng: bool,
    is_loading: bool,
    with_optimizer: bool = True,
) -> dict:
    state: dict = {}
    n = len(objs.model)
    for i, chunk in enumerate(objs.model):
        state[_model_key(i, n)] = megatron_fixes.sharded_state_dict(chunk.module)
    if with_optimizer:
        slots = optimizer_state.slots(objs.optimizer)
        model_state = {k: v for k, v in state.items() if k.startswith("model")}
        build = optimizer_state.loading_states if is_loading else optimizer_state.saving_states
        state["optimizer_state"] = build(model_state, slots)
        state["adam_step"] = 0 if is_loading else optimizer_state.adam_step(objs.optimizer)
    state["scheduler"] = objs.scheduler.state_dict()
    state["progress"] = asdict(progress)
    if with_rng:
        state["rng_state"] = _rng_object()
    return state


def _model_key(index: int, count: int) -> str:
    return "model" if count == 1 else f"model{index}"


def _rng_object() -> ShardedObject:
    """Per-rank RNG states (CPU, CUDA if any, Megatron's tracker, the device they belong to),
    one shard per global rank."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    rng = {
        "cpu": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
        "device": rng_device(),
    }
    if rng["device"] == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state()
    return ShardedObject("rng_state", rng, (world,), (rank,), replica_id=0)


def rng_device() -> str:
    """Whose generators Megatron's RNG tracker forks on this rank: "cuda" on GPU ranks, "cpu" on
    CPU ranks (the CPU adapter makes the CUDA RNG the CPU default generator)."""
    return "cuda" if torch.cuda.is_available() and not _cpu_adapter_on() else "cpu"


def set_rng_states(rng: dict) -> None:
    """Restore a checkpoint's RNG states on this rank. The CPU generator always carries over;
    the CUDA and tracker states only to a rank of the same device: a GPU's Philox state is not a
    CPU generator's state (a GPU checkpoint resumed on CPU ranks of the same layout, or back)."""
    torch.set_rng_state(rng["cpu"])
    saved = rng.get("device", "cuda" if "cuda" in rng else "cpu")  # older checkpoints: no tag
    if saved != rng_device():
        log.warning(
            "checkpoint RNG states were saved on %s ranks and this rank is a %s rank: only the "
            "CPU generator is restored; Megatron's tracker streams (dropout) start from the seed",
            saved,
            rng_device(),
        )
        return
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])


def _cpu_adapter_on() -> bool:
    from moe_parallel.runtime import cpu_adapter as device

    return device.is_active()


def layout_of(cfg: RunConfig) -> dict:
    """The parallel layout a checkpoint records (meta.json "layout")."""
    p = cfg.parallel
    return {
        "tensor": p.tensor,
        "pipeline": p.pipeline,
        "virtual_pipeline": p.virtual_pipeline,
        "context": p.context,
        "expert": p.expert,
        "expert_tensor": p.expert_tensor_size,
        "data": p.data,
        "distributed_optimizer": p.distributed_optimizer,
    }


def _write_meta(path: Path, progress: Progress, cfg: RunConfig) -> None:
    meta = {
        "step": progress.step,
        "consumed_samples": progress.consumed_samples,
        "layout": layout_of(cfg),
        "model": cfg.model.model_dump(mode="json"),
        "model_fingerprint": model_fingerprint(cfg),
        "config": dump_config(cfg),
        "saved_at": time.time(),
        "pipeline_stages": parallel_state.get_pipeline_model_parallel_world_size(),
    }
    write_durable(path / META, json.dumps(meta, indent=1))
