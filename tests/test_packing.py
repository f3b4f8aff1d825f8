"""Padding-free packing gives the same loss and gradients as right-padded batches (the fast path keeps numerics)."""

from __future__ import annotations

import torch
from transformers import AutoModel

import finetune  # noqa: F401
from finetune.dataset import DataCollator


def test_packed_and_padded_batches_have_equal_loss_and_gradients(golden_dir, mixed_samples):
    _, items, pad = mixed_samples
    model = AutoModel.from_pretrained(golden_dir, attn_implementation="sdpa").train()

    results = []
    for packing in (False, True):
        batch = DataCollator(pad, packing=packing)(items)
        assert ("attention_mask" in batch) is not packing
        model.zero_grad()
        count = (batch["labels"][:, 1:] != -100).sum()
        loss = model(
            data=batch["data"],
            labels=batch["labels"],
            attention_mask=batch.get("attention_mask"),
            num_items_in_batch=count,
        ).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (padded_loss, padded_grads), (packed_loss, packed_grads) = results
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
