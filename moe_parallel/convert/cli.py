"""``moectl convert SRC OUT``: Hugging Face <-> Megatron, the direction read from SRC.

- SRC a Hugging Face directory (config.json + weights): OUT becomes a directory with
  ``config.yaml`` (a run config for our schema, ``checkpoint.init_from`` set to the converted
  checkpoint) and ``checkpoints/step_00000000`` (a Megatron distributed checkpoint that loads
  under any layout). ``key=value`` overrides change the run config (e.g. ``parallel.expert=2``).
- SRC one of our checkpoints (a step directory, a checkpoints directory or a run directory):
  OUT becomes a Hugging Face directory (config.json + model.safetensors); the architecture is
  ``--arch`` or the first supported one that can express the model.

Everything that can be checked without loading weights is checked first (architecture, config
fields, the output directory, that every weight file is whole); the tensors are converted by a
1-rank CPU job of the local backend (moe_parallel/convert/entry.py) in a job directory of its own,
kept and named when the job fails. The output is written beside OUT and renamed to OUT when the
conversion succeeded, so a failed or refused conversion leaves no OUT behind.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from . import ARCHITECTURES, architecture_by_name, architecture_for
from .core import DTYPES_TO_OURS, ConvertError, hf_dtype
from .entry import REPORT
from .hf_files import CONFIG, HFWeights, block_size, read_config

CHECKPOINT = Path("checkpoints") / "step_00000000"


def convert_command(
    src: str, out: str, arch: str | None = None, overrides: list[str] = (), stream: bool = True
) -> int:
    source, target = Path(src), Path(out)
    if not source.is_dir():
        raise ConvertError(f"{src}: not a directory (a Hugging Face checkpoint or one of ours)")
    _require_empty(target)
    if (source / CONFIG).is_file():
        if arch is not None:
            raise ConvertError(
                "--arch is for Megatron -> Hugging Face; a Hugging Face "
                "checkpoint names its own architecture"
            )
        return hf_to_megatron(source, target, overrides, stream)
    if overrides:
        raise ConvertError(f"overrides {list(overrides)} apply to Hugging Face -> Megatron only")
    return megatron_to_hf(find_checkpoint(source), target, arch, stream)


def hf_to_megatron(
    source: Path, target: Path, overrides: list[str] = (), stream: bool = True
) -> int:
    from ..config import config_from_dict, dump_config

    hf = read_config(source)
    arch = architecture_for(hf, str(source))  # an unsupported architecture stops here
    raw = run_config(hf, arch, source, target)
    cfg = config_from_dict(raw, overrides, source=f"{source} (converted)")
    HFWeights(source).check_files()  # a truncated or unreadable weight file stops here
    block_size(hf)  # a quantisation other than block-wise FP8 stops here
    with staged_output(target) as staging:
        (staging / "config.yaml").write_text(
            f"# Converted from {source.resolve()} ({arch.HF_CLASS}) by moectl "
            "convert.\n# Set data.* (and data.tokenizer) for your corpus; "
            "train.* for your finetune.\n" + dump_config(cfg)
        )
        (staging / "hf_config.json").write_text(json.dumps(hf, indent=1))
        run_job(
            {
                "direction": "to_megatron",
                "hf_dir": str(source.resolve()),
                "config": str(staging / "config.yaml"),
                "out": str(staging / "checkpoints"),
                # fp16 weights are stored exactly in fp32 (CPU ranks have no fp16)
                "precision": "fp32" if hf_dtype(hf) == "float16" else None,
            },
            stream,
        )
    print(
        f"converted {arch.HF_CLASS} to {target / CHECKPOINT}; train from it with: "
        f"moectl train {target / 'config.yaml'}",
        flush=True,
    )
    return 0


def run_config(hf: dict, arch, source: Path, target: Path) -> dict:
    """The run config of a converted model: its model section, a 1-rank layout, a modest
    finetune schedule in the checkpoint's precision, and the converted checkpoint as init_from."""
    dtype = hf_dtype(hf)
    precision = DTYPES_TO_OURS.get(dtype)
    if precision is None:
        raise ConvertError(f"dtype={dtype!r}: supported dtypes are {', '.join(DTYPES_TO_OURS)}")
    data: dict = {}
    tokenizer = source / "tokenizer.json"
    if tokenizer.is_file() and '"<|endoftext|>"' in tokenizer.read_text(errors="replace"):
        data["tokenizer"] = str(tokenizer.resolve())  # ours needs that end-of-document token
    try:
        model = arch.model_section(hf)
    except ConvertError as exc:
        raise ConvertError(f"{source / CONFIG}: {exc}") from exc
    return {
        "name": source.resolve().name,
        "model": model,
        "train": {
            "steps": 100,
            "global_batch_size": 8,
            "lr": 1.0e-5,
            "min_lr": 1.0e-6,
            "warmup_steps": 10,
            "precision": precision,
        },
        "data": data,
        "checkpoint": {"init_from": str((target / CHECKPOINT).resolve())},
    }


def megatron_to_hf(checkpoint: Path, target: Path, arch: str | None, stream: bool = True) -> int:
    from ..ckpt.checkpoint import read_meta
    from ..config import config_from_dict

    meta = read_meta(checkpoint)
    cfg = config_from_dict(yaml.safe_load(meta["config"]), source=f"{checkpoint}/meta.json")
    source = source_hf_config(checkpoint, cfg)
    if arch is None and source and (source.get("architectures") or [None])[0] in ARCHITECTURES:
        arch = source["architectures"][0]  # the architecture it was converted from, if it fits
    module = choose_architecture(cfg.model, arch)
    keep = {k: source[k] for k in KEPT_FIELDS if source and k in source}
    with staged_output(target) as staging:
        run_job(
            {
                "direction": "to_hf",
                "checkpoint": str(checkpoint.resolve()),
                "config": meta["config"],
                "config_is_text": True,
                "arch": module.MODEL_TYPE,
                "out": str(staging.resolve()),
                "keep": keep,
            },
            stream,
        )
    print(f"converted {checkpoint} to {module.HF_CLASS} in {target}", flush=True)
    return 0


# Fields of the original config.json that the weights do not decide: carried back unchanged.
KEPT_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def source_hf_config(checkpoint: Path, cfg) -> dict | None:
    """The config.json a model was converted from: next to the converted checkpoint
    (``OUT/hf_config.json``), or next to the checkpoint a finetune started from (init_from)."""
    candidates = [checkpoint.parent.parent / "hf_config.json"]
    if cfg.checkpoint.init_from:
        candidates.append(Path(cfg.checkpoint.init_from).parent.parent / "hf_config.json")
    for path in candidates:
        if path.is_file():
            return json.loads(path.read_text())
    return None


def choose_architecture(model, arch: str | None):
    """``--arch``, which must be able to express the model; else the first that can."""
    candidates = [architecture_by_name(arch)] if arch else list(ARCHITECTURES.values())
    reasons = {}
    for module in candidates:
        why = module.limits(model)
        if not why:
            return module
        reasons[module.HF_CLASS] = why
    detail = "; ".join(f"{name}: {', '.join(why)}" for name, why in reasons.items())
    raise ConvertError(
        f"the checkpoint's model cannot be written as {' or '.join(reasons)}: {detail}"
    )


def find_checkpoint(path: Path) -> Path:
    """A step directory, or the latest checkpoint of a checkpoints directory or run directory."""
    from ..ckpt.checkpoint import META, resolve_checkpoint

    try:
        return resolve_checkpoint(path)
    except FileNotFoundError:
        pass  # the message below also says what a Hugging Face checkpoint would have
    raise ConvertError(
        f"{path}: neither a Hugging Face checkpoint ({CONFIG}) nor one of ours "
        f"(a step directory with {META}, or a checkpoints/run directory with a "
        "'latest' checkpoint)"
    )


def _require_empty(target: Path) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConvertError(f"{target}: the output directory exists and is not empty")


@contextmanager
def staged_output(target: Path) -> Iterator[Path]:
    """A new directory beside ``target`` to write the output into, renamed to ``target`` when
    the block succeeds and removed when it does not: a failed or refused conversion leaves no
    ``target`` behind, so the same command can run again."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        try:
            staging.rename(target)  # replaces an empty target directory
        except OSError as exc:
            raise ConvertError(f"{target}: cannot move the converted output there ({exc})") from exc
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def run_job(spec: dict, stream: bool) -> None:
    """Run the conversion job in a job directory of its own: removed when the job succeeds or
    refuses (the refusal becomes this command's error), kept when it crashes (its log named)."""
    from cluster import RunSpec, run_local
    from moe_parallel.runtime.bootstrap import local_rank_preload

    job_dir = Path(tempfile.mkdtemp(prefix="moectl-convert-"))
    (job_dir / "convert.json").write_text(json.dumps(spec, indent=1))
    code = run_local(
        RunSpec(
            job_dir,
            1,
            [sys.executable, "-m", "moe_parallel.convert.entry", str(job_dir)],
            preload=local_rank_preload(),
        ),
        stream=stream,
    )
    report = job_dir / REPORT
    done = json.loads(report.read_text()) if code != 0 and report.is_file() else {}
    if code == 0 or "error" in done:
        shutil.rmtree(job_dir)
    if "error" in done:
        raise ConvertError(done["error"])
    if code != 0:
        raise ConvertError(
            f"the conversion job failed (exit {code}); its log: {job_dir / 'logs' / 'rank0.log'}"
        )
