"""What every CPU rank imports, for the local backend's fork server (cluster/forkserver.py) to
import once and fork ranks from: torch, Megatron-core through our import hook (so its fusions stay
uncompiled on CPU), and TorchDynamo, which ``torch.optim`` imports at an optimizer's first step.
The process is prepared for CPU first (one intra-op thread, so no OpenMP pool exists to be
copied into the forks: each rank sets its own count in ``prepare_process``)."""

from .bootstrap import prepare_process

prepare_process("cpu")

import megatron.core  # noqa: E402,F401 -- after prepare_process, as in every rank
import torch._dynamo  # noqa: E402,F401
