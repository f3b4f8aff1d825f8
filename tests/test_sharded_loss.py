"""The loss over ZeRO-3's row shards of lm_head equals the cross-entropy against the whole weight."""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import free_port
from torch import nn

from finetune.model.sharded_loss import VocabShard, vocab_sharded_loss, zero3_vocab_shard

VOCAB, HIDDEN = 12, 8


def reference(states: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(states @ weight.T, targets, reduction="sum")


def test_a_single_shard_holding_every_row_gives_the_plain_loss_and_gradient():
    torch.manual_seed(0)
    weight, states, targets = (
        torch.randn(VOCAB, HIDDEN),
        torch.randn(7, HIDDEN, requires_grad=True),
        torch.randint(0, VOCAB, (7,)),
    )
    loss = vocab_sharded_loss(states, targets, VocabShard(rows=weight, first_row=0), chunk_size=3)
    (2 * loss).backward()
    plain = states.detach().clone().requires_grad_(True)
    (2 * reference(plain, targets, weight)).backward()
    assert loss.item() == pytest.approx(reference(plain, targets, weight).item(), rel=1e-6)
    torch.testing.assert_close(states.grad, plain.grad)


# Rank r holds COUNTS[case][r] label positions; rank 1 scales its loss by 3 (the ranks' normalisers differ).
COUNTS = {"uneven": (5, 9), "rank 1 has no labels": (6, 0)}


def _sharded_loss_on_rank(rank: int, port: int, counts: tuple[int, int], results) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same weight on both ranks; each then draws its own positions
        weight = torch.randn(VOCAB, HIDDEN)
        torch.manual_seed(1 + rank)
        states = torch.randn(counts[rank], HIDDEN, requires_grad=True)
        targets = torch.randint(0, VOCAB, (counts[rank],))
        if rank == 0 and counts[rank]:  # one target in each half of the vocabulary at least
            targets[:2] = torch.tensor([0, VOCAB - 1])
        rows = VOCAB // 2
        shard = VocabShard(rows=weight[rank * rows : (rank + 1) * rows], first_row=rank * rows, ranks=(0, 1))
        with torch.no_grad():  # evaluation: the forward alone, the same collectives
            evaluated = vocab_sharded_loss(states, targets, shard, chunk_size=4)
        loss = vocab_sharded_loss(states, targets, shard, chunk_size=4)
        ((1 + 2 * rank) * loss).backward()
        plain = states.detach().clone().requires_grad_(True)
        expected = reference(plain, targets, weight)
        ((1 + 2 * rank) * expected).backward()
        results[rank] = json.dumps({"loss": [loss.item(), expected.item()], "evaluated": evaluated.item(),
                                    "grad_error": (states.grad - plain.grad).abs().max().item() if counts[rank] else 0.0,
                                    "grad_size": plain.grad.abs().max().item() if counts[rank] else 0.0})  # fmt: skip
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("case", list(COUNTS))
def test_two_ranks_each_holding_half_the_vocabulary_get_the_whole_weights_loss_and_gradients(case):
    results = mp.Manager().dict()
    mp.spawn(_sharded_loss_on_rank, args=(free_port(), COUNTS[case], results), nprocs=2, join=True)
    for rank in (0, 1):
        result = json.loads(results[rank])
        assert result["loss"][0] == pytest.approx(result["loss"][1], rel=1e-5, abs=1e-6)
        assert result["evaluated"] == result["loss"][0]
        assert result["grad_error"] <= 1e-5 * max(1.0, result["grad_size"])
    assert json.loads(results[0])["grad_size"] > 0


def _deepspeed_shard_on_rank(rank: int, port: int, results) -> None:
    import os

    import deepspeed

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
        torch.manual_seed(0)
        with deepspeed.zero.Init(config_dict_or_path=config):
            heads = {"frozen": nn.Linear(HIDDEN, VOCAB, bias=False), "trained": nn.Linear(HIDDEN, VOCAB, bias=False),
                     "odd vocabulary": nn.Linear(HIDDEN, VOCAB + 1, bias=False)}  # fmt: skip
        heads["frozen"].weight.requires_grad_(False)
        heads["odd vocabulary"].weight.requires_grad_(False)
        shard = zero3_vocab_shard(heads["frozen"], torch.device("cpu"))
        with deepspeed.zero.GatheredParameters([heads["frozen"].weight]):
            whole = heads["frozen"].weight.detach().clone()
        results[rank] = json.dumps({
            "first_row": shard.first_row,
            "rows_match": torch.equal(shard.rows, whole[shard.first_row : shard.first_row + len(shard.rows)]),
            "rows": len(shard.rows),
            "trained": zero3_vocab_shard(heads["trained"], torch.device("cpu")) is None,
            "odd vocabulary": zero3_vocab_shard(heads["odd vocabulary"], torch.device("cpu")) is None,
            "plain linear": zero3_vocab_shard(nn.Linear(HIDDEN, VOCAB, bias=False).requires_grad_(False), torch.device("cpu")) is None,
            "quantized": _quantized_partition_refused(heads["frozen"]),
        })  # fmt: skip
    finally:
        torch.distributed.destroy_process_group()


def _quantized_partition_refused(head: nn.Linear) -> bool:
    """ZeRO++'s zero_quantized_nontrainable_weights keeps a frozen partition as int8 codes beside ds_quant_scale."""
    partition = head.weight.ds_tensor
    partition.ds_quant_scale = torch.ones(1)
    try:
        return zero3_vocab_shard(head, torch.device("cpu")) is None
    finally:
        del partition.ds_quant_scale


@pytest.mark.slow
def test_deepspeed_zero3_partitions_a_frozen_lm_head_into_whole_rows_each_rank_reads_in_place():
    pytest.importorskip("deepspeed")
    results = mp.Manager().dict()
    mp.spawn(_deepspeed_shard_on_rank, args=(free_port(), results), nprocs=2, join=True)
    ranks = [json.loads(results[rank]) for rank in (0, 1)]
    assert [r["first_row"] for r in ranks] == [0, VOCAB // 2] and all(r["rows"] == VOCAB // 2 for r in ranks)
    assert all(r["rows_match"] for r in ranks)
    # the plain path stays where the rows cannot be read in place: trained, cut mid-row, not partitioned, quantized
    assert all(r["trained"] and r["odd vocabulary"] and r["plain linear"] and r["quantized"] for r in ranks)
