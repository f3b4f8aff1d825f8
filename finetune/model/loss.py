"""The training loss of MiniCPMV: causal-LM cross-entropy on the label positions only, without the full logits.

With a 128k vocabulary the [tokens, vocab] logits of a 2k-token row are gigabytes in fp32, most of them at
positions without a label (the prompt, the image placeholders). `label_position_loss` computes logits only
where a label exists, a chunk at a time, and recomputes each chunk in backward instead of keeping it. Under
ZeRO-3 with a frozen lm_head each rank computes the logits of its own rows (`sharded_loss`); with liger-kernel
the label positions go to its fused linear cross-entropy instead (`kernels.apply_liger_kernels`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .parallel import is_distributed, is_zero3_partitioned
from .sharded_loss import vocab_sharded_loss, zero3_vocab_shard


def label_position_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head: nn.Module,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int = 2048,
    fused: bool = False,
    vocab_shards: bool = True,
) -> torch.Tensor:
    """Causal-LM cross-entropy computed only where a next-token label exists, in fp32, chunk by chunk.

    Equal to transformers' ForCausalLMLoss (shift, fp32 upcast, ignore -100), but the logits of the
    [tokens, vocab] matrix exist only for `chunk_size` label positions at a time, and each chunk's logits are
    recomputed in backward instead of kept: with a 128k vocabulary that is gigabytes saved per 2k tokens.
    `fused=True` hands the label positions to liger-kernel's fused linear cross-entropy instead (its own
    chunks; gradients computed in the forward pass, so lm_head is not recomputed). Where ZeRO-3 partitions a
    frozen lm_head on row boundaries, each rank computes the logits of its own rows (`sharded_loss`) unless
    `vocab_shards=False`.
    """
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100).to(hidden.device)
    selected = shifted != -100
    targets = shifted[selected]
    states = hidden[selected]
    if fused:
        total = _fused_loss(states, targets, lm_head)
        return _normalise(total, len(targets), num_items_in_batch)
    shard = zero3_vocab_shard(lm_head, hidden.device) if vocab_shards else None
    if shard is not None:  # ZeRO-3: each rank computes the logits of its own rows; lm_head is never gathered
        return _normalise(vocab_sharded_loss(states, targets, shard, chunk_size), len(targets), num_items_in_batch)
    total = hidden.new_zeros((), dtype=torch.float32)
    num_chunks = max(1, -(-len(targets) // chunk_size))
    if is_distributed() and is_zero3_partitioned(lm_head.parameters()):
        # Every chunk calls lm_head; under ZeRO-3 each call gathers its weight, so all ranks must make the same
        # number of calls whatever their label counts: the extra chunks are empty. (Elsewhere the count stays
        # local: this all-reduce would be a collective and a host sync in every step.)
        count = torch.tensor(num_chunks, device=hidden.device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        num_chunks = int(count)
    for index in range(num_chunks):
        start = index * chunk_size
        chunk_states, chunk_targets = states[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and chunk_states.requires_grad:
            total = total + checkpoint(_chunk_loss, chunk_states, chunk_targets, lm_head, use_reentrant=False)
        else:
            total = total + _chunk_loss(chunk_states, chunk_targets, lm_head)
    return _normalise(total, len(targets), num_items_in_batch)


def _normalise(total: torch.Tensor, label_count: int, num_items_in_batch: int | torch.Tensor | None) -> torch.Tensor:
    if num_items_in_batch is None:
        return total / max(label_count, 1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _chunk_loss(states: torch.Tensor, targets: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    return F.cross_entropy(lm_head(states).float(), targets, reduction="sum")


def _fused_loss(states: torch.Tensor, targets: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    if not len(targets):  # nothing to learn from: a zero that still reaches the graph
        return states.sum().float() * 0
    weight = lm_head.weight
    # Under autocast lm_head would run in the autocast dtype; the kernel runs in its inputs' dtype: match it.
    dtype = (
        torch.get_autocast_dtype(states.device.type) if torch.is_autocast_enabled(states.device.type) else weight.dtype
    )
    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight.to(dtype), states.to(dtype), targets)
    return loss.float()
