"""Importing Megatron-core without paying for what a rank may never use.

``import megatron.core`` imports all of it, and two parts cost a rank ~2 s of its ~4-5 s start
(measured on this machine kind, cProfile-free ``-X importtime``), in every rank process of every
run, restart and test:

- Megatron's fusions are decorated with ``torch.compile`` (``megatron.core.jit.jit_fuser``),
  and calling ``torch.compile(fn)`` imports TorchDynamo and Inductor (~1.2 s) although nothing
  is compiled before the first call, and on CPU ranks the fused paths are never called.
  During Megatron's import ``torch.compile`` is replaced by ``lazy_compile``, which calls the
  real ``torch.compile`` on the first call of the function: the same compiled function, the
  import deferred to when it is needed. Modules (``torch.compile(model)``) go to the real one.
  On CPU ranks (``MOE_PARALLEL_DEVICE=cpu``, set before Megatron is imported) the functions are
  not compiled at all: the router calls a fused function at every step, and compiling it cost
  each rank ~1.3 s at its first step for losses bit-identical to the uncompiled ones (measured,
  tiny config, 3 steps).
- Megatron's dynamic inference context imports Weights & Biases when installed (~0.5 s) for
  its own inference logging, which moe-parallel does not use. ``wandb`` is hidden during
  Megatron's import only; our W&B sink (``log.wandb``) imports it normally afterwards.

``install()`` (run by ``moe_parallel/__init__``) registers an import hook that does this around
the first import of ``megatron.core``; it imports nothing itself.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import inspect
import os
import sys

_TARGET = "megatron.core"


def lazy_compile(real_compile):
    """A ``torch.compile`` that compiles a plain function on its first call."""

    def compile_(model=None, **options):
        if model is None:  # used as @torch.compile(**options)
            return lambda fn: compile_(fn, **options)
        if not inspect.isfunction(model):
            return real_compile(model, **options)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = real_compile(model, **options)
            return compiled(*args, **kwargs)

        return call

    return compile_


def eager_on_cpu(real_compile):
    """CPU ranks: Megatron's fused functions run as written, never compiled."""

    def compile_(model=None, **options):
        if model is None:
            return lambda fn: compile_(fn, **options)
        return model if inspect.isfunction(model) else real_compile(model, **options)

    return compile_


class _Loader(importlib.abc.Loader):
    def __init__(self, real: importlib.abc.Loader):
        self.real = real

    def create_module(self, spec):
        return self.real.create_module(spec)

    def __getattr__(self, name):  # is_package, get_resource_reader, ...: the real loader's
        return getattr(self.real, name)

    def exec_module(self, module) -> None:
        import torch

        real_compile = torch.compile
        hid_wandb = "wandb" not in sys.modules
        torch.compile = (
            eager_on_cpu(real_compile)
            if os.environ.get("MOE_PARALLEL_DEVICE") == "cpu"
            else lazy_compile(real_compile)
        )
        if hid_wandb:
            sys.modules["wandb"] = None  # `import wandb` raises ImportError: Megatron skips it
        try:
            self.real.exec_module(module)
        finally:
            torch.compile = real_compile
            if hid_wandb and sys.modules.get("wandb", 0) is None:
                del sys.modules["wandb"]


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)  # once; the real finders resolve the spec
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    if _TARGET in sys.modules or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())
