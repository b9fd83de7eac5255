"""Hugging Face checkpoint directories: config.json plus weights, read lazily and written.

Read: ``model.safetensors``, sharded safetensors (``model.safetensors.index.json``),
``pytorch_model.bin`` or sharded ``.bin`` (``pytorch_model.bin.index.json``). Safetensors are
read one tensor at a time (memory-mapped), so a converter holds the model once, not twice.
Written: ``config.json`` and ``model.safetensors`` (one file), which ``from_pretrained`` loads.
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
