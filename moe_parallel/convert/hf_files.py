"""Hugging Face checkpoint directories: config.json plus weights, read lazily and written.

Read: ``model.safetensors``, sharded safetensors (``model.safetensors.index.json``),
``pytorch_model.bin`` or sharded ``.bin`` (``pytorch_model.bin.index.json``). Safetensors are
read one tensor at a time (memory-mapped), so a converter holds the model once, not twice.
Written: ``config.json`` and ``model.safetensors`` (one file), which ``from_pretrained`` loads.
"""

from __future__ import annotations

import json
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
            if file.endswith(".safetensors"):
                from safetensors import safe_open

                self._open[file] = safe_open(str(path), framework="pt")
            else:
                self._open[file] = torch.load(
                    path, map_location="cpu", weights_only=True, mmap=True
                )
        return self._open[file]

    def _index(self) -> dict[str, str]:
        d = self.directory
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (d / index_name).is_file():
                return dict(json.loads((d / index_name).read_text())["weight_map"])
        if (d / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(d / "model.safetensors"), framework="pt") as f:
                return {k: "model.safetensors" for k in f.keys()}
        if (d / "pytorch_model.bin").is_file():
            state = torch.load(
                d / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True
            )
            self._open = {"pytorch_model.bin": state}
            return {k: "pytorch_model.bin" for k in state}
        raise ConvertError(
            f"{d}: no weights (model.safetensors, model.safetensors.index.json, "
            "pytorch_model.bin or pytorch_model.bin.index.json)"
        )


def write_hf(directory: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(directory / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (directory / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
