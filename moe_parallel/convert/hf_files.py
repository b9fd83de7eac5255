"""Hugging Face checkpoint directories: config.json plus weights, read lazily and written.

Read: ``model.safetensors``, sharded safetensors (``model.safetensors.index.json``),
``pytorch_model.bin`` or sharded ``.bin`` (``pytorch_model.bin.index.json``). Safetensors are
read one tensor at a time (memory-mapped), so a converter holds the model once, not twice.
Written: ``config.json`` and ``model.safetensors`` (one file), which ``from_pretrained`` loads.
Block-wise FP8 weights (DeepSeek-V3's release) are read dequantised (:class:`DequantisedWeights`).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from .core import ConvertError

CONFIG = "config.json"
# Buffers some older checkpoints carry that are recomputed from the config, never weights.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def read_config(directory: Path) -> dict:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise ConvertError(f"{directory}: no {CONFIG} (not a Hugging Face checkpoint directory)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConvertError(f"{path}: not valid JSON ({exc})") from exc


class HFWeights:
    """The tensors of a checkpoint directory by name, loaded on demand."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._open: dict[str, object] = {}
        self._where = self._index()

    def check_files(self) -> None:
        """Open every weight file: a safetensors file's header must cover the whole file, so a
        truncated or damaged file is refused here, naming it, before any tensor is read."""
        for file in sorted(set(self._where.values())):
            self._handle(file)

    def names(self) -> set[str]:
        return {n for n in self._where if not n.endswith(IGNORED_SUFFIXES)}

    def get(self, name: str, wanted_by: str) -> torch.Tensor:
        if name not in self._where:
            raise ConvertError(
                f"{self.directory}: tensor {name} is missing (needed for {wanted_by})"
            )
        file = self._where[name]
        if file.endswith(".safetensors"):
            return self._handle(file).get_tensor(name)
        return self._handle(file)[name]

    def _handle(self, file: str):
        if file not in self._open:
            path = self.directory / file
            if not path.is_file():
                raise ConvertError(
                    f"{self.directory}: weight file {file} (named by the index) is missing"
                )
            self._open[file] = open_weights(path)
        return self._open[file]

    def _index(self) -> dict[str, str]:
        d = self.directory
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (d / index_name).is_file():
                return dict(json.loads((d / index_name).read_text())["weight_map"])
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (d / name).is_file():
                self._open = {name: open_weights(d / name)}
                return {k: name for k in self._open[name].keys()}
        raise ConvertError(
            f"{d}: no weights (model.safetensors, model.safetensors.index.json, "
            "pytorch_model.bin or pytorch_model.bin.index.json)"
        )


# DeepSeek-V3's FP8 release: each quantised ``X.weight`` (float8_e4m3fn) has ``X.weight_scale_inv``
# (float32, one per weight_block_size block, the last blocks possibly partial); the weight is the
# FP8 value times its block's scale (deepseek-ai/DeepSeek-V3 inference/fp8_cast_bf16.py).
SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = (torch.float8_e4m3fn,)


def block_size(hf: dict) -> tuple[int, int] | None:
    """The FP8 block of config.json's ``quantization_config`` (None: not quantised); any other
    quantisation is refused, naming it."""
    quant = hf.get("quantization_config")
    if not quant:
        return None
    method, block = quant.get("quant_method"), quant.get("weight_block_size")
    if method != "fp8" or not (
        isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) for b in block)
    ):
        raise ConvertError(
            f"quantization_config (quant_method={method!r}, weight_block_size={block!r}): only "
            "block-wise FP8 (quant_method 'fp8' with a [rows, columns] weight_block_size) is "
            "dequantised; dequantise other formats first"
        )
    return block[0], block[1]


class DequantisedWeights:
    """Weights whose FP8 tensors are read as float32 (value x its block's scale); the scales
    themselves are not weights of the model."""

    def __init__(self, weights, block: tuple[int, int]) -> None:
        self.weights, self.block = weights, block

    def names(self) -> set[str]:
        return {n for n in self.weights.names() if not n.endswith(SCALE_SUFFIX)}

    def get(self, name: str, wanted_by: str) -> torch.Tensor:
        value = self.weights.get(name, wanted_by)
        if name + SCALE_SUFFIX not in self.weights.names():
            return value  # not quantised (embeddings, norms, routers)
        if value.dtype not in FP8_DTYPES:
            raise ConvertError(f"{name} has dtype {value.dtype} beside its {SCALE_SUFFIX}: not FP8")
        scale = self.weights.get(name + SCALE_SUFFIX, wanted_by)
        rows, cols = value.shape
        blocks = (-(-rows // self.block[0]), -(-cols // self.block[1]))
        if tuple(scale.shape) != blocks:
            raise ConvertError(
                f"{name}{SCALE_SUFFIX} has shape {tuple(scale.shape)}, expected {blocks} for "
                f"{name} {tuple(value.shape)} in blocks of {self.block}"
            )
        per_element = scale.float().repeat_interleave(self.block[0], 0)[:rows]
        per_element = per_element.repeat_interleave(self.block[1], 1)[:, :cols]
        return value.float() * per_element


def open_weights(path: Path):
    """A safetensors file (memory-mapped, read one tensor at a time) or a torch ``.bin`` state
    dict; a file that cannot be read is refused naming it, in one line."""
    if path.name.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open

        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise ConvertError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:
        reason = " ".join(str(exc).split())  # torch's messages span lines
        raise ConvertError(f"{path}: not a readable PyTorch weights file ({reason})") from exc


def write_hf(directory: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(directory / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (directory / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
