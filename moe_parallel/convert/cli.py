"""``moectl convert SRC OUT``: Hugging Face <-> Megatron, the direction read from SRC.

- SRC a Hugging Face directory (config.json + weights): OUT becomes a directory with
  ``config.yaml`` (a run config for our schema, ``checkpoint.init_from`` set to the converted
  checkpoint) and ``checkpoints/step_00000000`` (a Megatron distributed checkpoint that loads
  under any layout). ``key=value`` overrides change the run config (e.g. ``parallel.expert=2``).
- SRC one of our checkpoints (a step directory, a checkpoints directory or a run directory):
  OUT becomes a Hugging Face directory (config.json + model.safetensors); the architecture is
  ``--arch`` or the first supported one that can express the model.

Everything that can be checked without loading weights is checked first (architecture, config
fields, the output directory); the tensors are converted by a 1-rank CPU job of the local
backend (moe_parallel/convert/entry.py), whose log is in ``OUT/logs`` (HF -> Megatron) or in the
job directory it names (Megatron -> HF).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from . import ARCHITECTURES, architecture_by_name, architecture_for
from .core import DTYPES_TO_OURS, ConvertError, hf_dtype
from .entry import REPORT
from .hf_files import CONFIG, read_config

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
    target.mkdir(parents=True, exist_ok=True)
    config_path = target / "config.yaml"
    config_path.write_text(
        f"# Converted from {source.resolve()} ({arch.HF_CLASS}) by moectl "
        "convert.\n# Set data.* (and data.tokenizer) for your corpus; "
        "train.* for your finetune.\n" + dump_config(cfg)
    )
    (target / "hf_config.json").write_text(json.dumps(hf, indent=1))
    code = _run_job(
        target,
        {
            "direction": "to_megatron",
            "hf_dir": str(source.resolve()),
            "config": str(config_path),
            "out": str(target / "checkpoints"),
            # fp16 weights are stored exactly in fp32 (CPU ranks have no fp16)
            "precision": "fp32" if hf_dtype(hf) == "float16" else None,
        },
        stream,
    )
    if code == 0:
        print(
            f"converted {arch.HF_CLASS} to {target / CHECKPOINT}; train from it with: "
            f"moectl train {config_path}",
            flush=True,
        )
    return code


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
    return {
        "name": source.resolve().name,
        "model": arch.model_section(hf),
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
    job = Path(tempfile.mkdtemp(prefix="moectl-convert-"))
    keep = {k: source[k] for k in KEPT_FIELDS if source and k in source}
    code = _run_job(
        job,
        {
            "direction": "to_hf",
            "checkpoint": str(checkpoint.resolve()),
            "config": meta["config"],
            "config_is_text": True,
            "arch": module.MODEL_TYPE,
            "out": str(target.resolve()),
            "keep": keep,
        },
        stream,
    )
    if code == 0:
        shutil.rmtree(job, ignore_errors=True)
        print(f"converted {checkpoint} to {module.HF_CLASS} in {target}", flush=True)
    return code


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


def _run_job(job_dir: Path, spec: dict, stream: bool) -> int:
    from cluster import RunSpec, run_local

    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "convert.json").write_text(json.dumps(spec, indent=1))
    code = run_local(
        RunSpec(job_dir, 1, [sys.executable, "-m", "moe_parallel.convert.entry", str(job_dir)]),
        stream=stream,
    )
    report = job_dir / REPORT
    if code != 0:
        done = json.loads(report.read_text()) if report.is_file() else {}
        if "error" in done:
            raise ConvertError(done["error"])
        print(
            f"moectl convert: the conversion job failed (exit {code}); its log: "
            f"{job_dir / 'logs' / 'rank0.log'}",
            file=sys.stderr,
            flush=True,
        )
    return code
