"""The padded vocabulary rows kept out of the softmax.

Megatron pads the vocabulary to a multiple of 128 x TP (``vocab.padded_vocab_size``). The padded
rows of the output layer are no tokens, yet their logits (0 for a converted model, whatever the
initialisation gives ours) would count in the cross entropy's normaliser: a converted model's
loss came out above transformers' on the same weights by exactly the log of the extra
``exp(0)`` terms. A forward hook on the output layer sets the logits of padded ids to
``PADDED_LOGIT`` on every rank's vocabulary shard, before Megatron's (vocab-parallel) cross
entropy, the multi-token-prediction losses and any sampling, so the loss, the gradients and
the distribution are those of the real vocabulary. Masked positions get no gradient
(``masked_fill_``), so padded rows of the output weight never train.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state

# exp(PADDED_LOGIT - max logit) is exactly 0 in fp32 and bf16 for any max logit above -9900;
# finite, so that sums and differences of logits stay finite (a -inf would give nan there).
PADDED_LOGIT = -1.0e4


def mask_padded_vocab(chunks: list, vocab_size: int) -> None:
    """Hook the output layer of each model chunk that has one (the last pipeline stage) so that
    logits of ids >= ``vocab_size`` (the unpadded vocabulary) are ``PADDED_LOGIT``."""
    for chunk in chunks:
        layer = getattr(chunk, "output_layer", None)
        if layer is None:
            continue
        shard = layer.output_size_per_partition
        ranks = parallel_state.get_tensor_model_parallel_world_size()
        if shard * ranks == vocab_size:
            continue  # nothing padded
        start = parallel_state.get_tensor_model_parallel_rank() * shard
        layer.register_forward_hook(
            partial(_mask_logits, vocab_size=vocab_size, shard_start=start, shard=shard)
        )


def _mask_logits(layer, args, output, *, vocab_size: int, shard_start: int, shard: int):
    """``output``: (logits [S, B, V/TP] or gathered [S, B, V], bias) of a ColumnParallelLinear."""
    logits, bias = output
    # This rank's shard starts at shard_start; gathered logits (inference) start at id 0.
    first = shard_start if logits.shape[-1] == shard else 0
    ids = torch.arange(first, first + logits.shape[-1], device=logits.device)
    # In place: the logits are the largest activation of the step, and the linear that made
    # them saved its input and weight, not its output, so autograd allows the in-place fill.
    return logits.masked_fill_(ids >= vocab_size, PADDED_LOGIT), bias
