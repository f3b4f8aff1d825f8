"""Cross-entropy over a vocabulary that ZeRO-3 has split across the ranks, without gathering lm_head.

ZeRO-3 keeps each parameter flattened and cut into equal pieces, one per rank. For the output projection
([vocab, hidden], 1 GiB in bf16 at Llama-3's 128,256 x 4,096) the pieces fall on row boundaries whenever the
world size divides the vocabulary: each rank then holds whole rows, the weights of a contiguous range of
vocabulary ids. The loss can be computed from those rows alone, in the manner of Megatron's vocab-parallel
cross-entropy, except that the ranks also hold different tokens (data parallel):

- forward: each rank's label positions are broadcast in turn; every rank computes, for those positions, the
  log-sum-exp of its own rows' logits and the target's logit when its rows hold the target; two all-reduces
  over [positions] floats combine them into the exact log-softmax;
- backward: each rank's positions are broadcast again, every rank computes (softmax - one-hot) on its rows
  times its rows, and the partial gradients are summed onto the owning rank by a reduce.

What this saves: lm_head's weight is never gathered, where the plain path holds its 1 GiB gathered copy from
the loss through the whole backward pass (DeepSpeed charges a weight gathered in the loss to the outermost
module, which is released only when backward ends). What it costs: the same matmul FLOPs as the plain chunked loss, the label positions' hidden states
sent twice (16 MiB per 2,048 positions in bf16), their fp32 gradients reduced once (32 MiB), and a few
all-reduces of [positions] floats.

Only a frozen weight qualifies (LoRA trains no lm_head; `--tune_embeddings` does and takes the plain path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class VocabShard:
    """This rank's rows of the output projection: vocabulary ids first_row .. first_row + len(rows) - 1."""

    rows: torch.Tensor  # [rows, hidden], the rank's own ZeRO-3 partition viewed as rows (no copy)
    first_row: int
    ranks: tuple[int, ...] = ()  # the global ranks that share the weight; () in a single process


# ranks -> (the default group it was made under, the loss's communicator): a re-initialised default group
# (destroy_process_group, then init again in one process) invalidates the communicator.
_LOSS_GROUPS: dict[tuple[int, ...], tuple[dist.ProcessGroup, dist.ProcessGroup]] = {}


def zero3_vocab_shard(lm_head: nn.Module, device: torch.device) -> VocabShard | None:
    """This rank's rows of a ZeRO-3-partitioned, frozen, bias-free lm_head, or None where the plain path
    must run: not partitioned, trained, offloaded off `device`, stored quantized (ZeRO++'s
    zero_quantized_nontrainable_weights keeps int8 codes), partitioned over a subgroup of the ranks, or cut
    across rows (world sizes that do not divide the vocabulary). Local: no collective, so one rank alone may
    ask (reports do)."""
    if type(lm_head) is not nn.Linear or lm_head.bias is not None:
        return None
    # Read from the module's dict: under ZeRO-3 a parameter read inside a forward can gather it.
    weight = dict.get(lm_head._parameters, "weight")
    if weight is None or weight.requires_grad or not hasattr(weight, "ds_tensor") or weight.ds_tensor is None:
        return None
    vocab, hidden = weight.ds_shape
    partition = weight.ds_tensor
    group = getattr(weight, "ds_process_group", None)
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    size = partition.ds_numel if hasattr(partition, "ds_numel") else partition.numel()
    if size % hidden or size * world != vocab * hidden or partition.device != device:
        return None
    if partition.dtype != weight.dtype or hasattr(partition, "ds_quant_scale"):
        return None
    # The loss's communicator is made by every rank together (dist.new_group), so every rank must name the same
    # ranks: true of the whole world, not of data-parallel subgroups (sequence or expert parallelism).
    if world > 1 and world != dist.get_world_size():
        return None
    rows = partition.view(-1)[:size].view(size // hidden, hidden)
    ranks = tuple(dist.get_process_group_ranks(group or dist.group.WORLD)) if world > 1 else ()
    return VocabShard(rows=rows, first_row=rank * (size // hidden), ranks=ranks)


def _loss_group(ranks: tuple[int, ...]) -> dist.ProcessGroup | None:
    """A communicator of the loss's own over these ranks (None for none): its collectives then cannot
    interleave with DeepSpeed's gathers on the weight's group. Created on the first loss call, which every
    rank makes."""
    if not ranks:
        return None
    made_under, group = _LOSS_GROUPS.get(ranks, (None, None))
    if made_under is not dist.group.WORLD:
        group = dist.new_group(list(ranks))
        _LOSS_GROUPS[ranks] = (dist.group.WORLD, group)
    return group


def vocab_sharded_loss(states: torch.Tensor, targets: torch.Tensor, shard: VocabShard, chunk_size: int) -> torch.Tensor:
    """Summed fp32 cross-entropy of `states @ weight.T` against `targets` (this rank's label positions), where
    this rank holds only `shard` of the weight. Every rank of the shard's group must call it together."""
    group = _loss_group(shard.ranks)
    if torch.is_grad_enabled() and states.requires_grad:
        return _VocabShardedCrossEntropy.apply(states, targets, shard, group, chunk_size)
    with torch.no_grad():
        return _forward(states, targets, shard, group, chunk_size)[0]


class _VocabShardedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, states, targets, shard, group, chunk_size):
        total, plan, log_normalisers = _forward(states, targets, shard, group, chunk_size)
        ctx.shard, ctx.group, ctx.chunk_size, ctx.plan = shard, group, chunk_size, plan
        ctx.save_for_backward(states, log_normalisers)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        states, log_normalisers = ctx.saved_tensors
        shard, group, plan = ctx.shard, ctx.group, ctx.plan
        # Each rank scales its own positions' gradient by its own upstream gradient.
        scales = _all_gather(grad_total.float().reshape(()), group)
        grad_states = None
        for peer, peer_states, peer_targets in _each_ranks_positions(states, plan, group):
            peer_lse = log_normalisers[plan.offsets[peer] : plan.offsets[peer] + len(peer_targets)]
            partial = torch.empty(peer_states.shape, dtype=torch.float32, device=states.device)
            for start in range(0, len(peer_targets), ctx.chunk_size):
                end = start + ctx.chunk_size
                probabilities = torch.exp(_logits(peer_states[start:end], shard) - peer_lse[start:end, None])
                owned, columns = _owned_targets(peer_targets[start:end], shard)
                # d(lse - target logit) / d logits = softmax - one-hot (the one only where this shard holds it)
                probabilities.scatter_add_(1, columns[:, None], -owned[:, None].to(probabilities.dtype))
                probabilities *= scales[peer]
                # Cast as autograd would through `.float()`, then the bf16 matmul against the rows.
                partial[start:end] = probabilities.to(states.dtype) @ shard.rows.to(states.dtype)
            if group is not None:
                dist.reduce(partial, dst=dist.get_global_rank(group, peer), group=group)
            if peer == plan.rank:
                grad_states = partial.to(states.dtype)
        if grad_states is None:  # no label positions here: still a gradient of the right shape
            grad_states = torch.zeros_like(states)
        return grad_states, None, None, None, None


@dataclass(frozen=True)
class _Plan:
    """Who holds how many label positions; their targets, concatenated rank after rank."""

    rank: int
    counts: list[int]
    offsets: list[int]
    targets: torch.Tensor


def _forward(states, targets, shard: VocabShard, group, chunk_size: int):
    plan = _plan(targets, group)
    lse_parts, target_parts = [], []
    for _peer, peer_states, peer_targets in _each_ranks_positions(states, plan, group):
        for start in range(0, len(peer_targets), chunk_size):
            logits = _logits(peer_states[start : start + chunk_size], shard)
            owned, columns = _owned_targets(peer_targets[start : start + chunk_size], shard)
            picked = logits.gather(1, columns[:, None]).squeeze(1)
            lse_parts.append(torch.logsumexp(logits, dim=1))
            target_parts.append(torch.where(owned, picked, 0.0))
    empty = states.new_zeros(0, dtype=torch.float32)
    local_lse = torch.cat(lse_parts) if lse_parts else empty
    target_logits = torch.cat(target_parts) if target_parts else empty
    if group is not None:  # log(sum over ranks of exp(lse)), shifted by the maximum for range
        maximum = local_lse.clone()
        dist.all_reduce(maximum, op=dist.ReduceOp.MAX, group=group)
        sums = torch.stack([torch.exp(local_lse - maximum), target_logits])
        dist.all_reduce(sums, group=group)
        log_normalisers, target_logits = maximum + torch.log(sums[0]), sums[1]
    else:
        log_normalisers = local_lse
    mine = slice(plan.offsets[plan.rank], plan.offsets[plan.rank] + plan.counts[plan.rank])
    total = (log_normalisers[mine] - target_logits[mine]).sum()
    return total, plan, log_normalisers


def _plan(targets: torch.Tensor, group) -> _Plan:
    if group is None:
        return _Plan(rank=0, counts=[len(targets)], offsets=[0], targets=targets)
    counts = [int(c) for c in _all_gather(torch.tensor(len(targets), device=targets.device), group)]  # a host sync
    padded = targets.new_full((max(counts),), -1)  # buffer sizes depend on the counts
    padded[: len(targets)] = targets
    all_targets = _all_gather(padded, group)
    offsets = [sum(counts[:peer]) for peer in range(len(counts))]
    concatenated = torch.cat([t[:count] for t, count in zip(all_targets, counts, strict=True)])
    return _Plan(rank=dist.get_rank(group), counts=counts, offsets=offsets, targets=concatenated)


def _each_ranks_positions(states: torch.Tensor, plan: _Plan, group):
    """(rank, its label positions' states, their targets) for every rank holding any, the same order on all."""
    for peer, count in enumerate(plan.counts):
        if not count:
            continue
        if group is None or peer == plan.rank:
            peer_states = states.contiguous()
        else:
            peer_states = states.new_empty(count, states.shape[-1])
        if group is not None:
            dist.broadcast(peer_states, src=dist.get_global_rank(group, peer), group=group)
        yield peer, peer_states, plan.targets[plan.offsets[peer] : plan.offsets[peer] + count]


def _logits(states: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """fp32 logits of the shard's rows: the matmul in the states' dtype, as lm_head(states).float() does."""
    return (states @ shard.rows.to(states.dtype).T).float()


def _owned_targets(targets: torch.Tensor, shard: VocabShard) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether this shard holds each position's target, and its column among the rows (clamped into range
    where it does not: masks instead of indexing, so no host sync)."""
    columns = targets - shard.first_row
    owned = (columns >= 0) & (columns < len(shard.rows))
    return owned, columns.clamp(0, len(shard.rows) - 1)


def _all_gather(value: torch.Tensor, group) -> list[torch.Tensor]:
    """`value` as every rank of the group has it, in rank order."""
    if group is None:
        return [value]
    gathered = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, value, group=group)
    return gathered
