"""Padding-free packing gives the same loss and gradients as right-padded batches (the fast path keeps numerics)."""

from __future__ import annotations

import json

import torch
from transformers import AutoModel, AutoTokenizer

import finetune  # noqa: F401
from finetune.dataset import DataCollator, SupervisedDataset
from finetune.model.tokenization import SpecialTokens


def test_packed_and_padded_batches_have_equal_loss_and_gradients(golden_dir, golden_images, tmp_path):
    samples = [
        {"id": "wide", "image": str(golden_images / "wide_260x150.png"),
         "conversations": [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A wide picture of things."}]},
        {"id": "text", "conversations": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]},
        {"id": "two", "image": {"<image_00>": str(golden_images / "tall_120x330.png"), "<image_01>": str(golden_images / "small_90x70.png")},
         "conversations": [{"role": "user", "content": "<image_00> and <image_01>: which is taller?"}, {"role": "assistant", "content": "The first."},
                           {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]},
    ]  # fmt: skip
    path = tmp_path / "data.json"
    path.write_text(json.dumps(samples))
    tokenizer = AutoTokenizer.from_pretrained(golden_dir)
    model = AutoModel.from_pretrained(golden_dir, attn_implementation="sdpa").train()
    dataset = SupervisedDataset(str(path), tokenizer, model.config)
    items = [dataset[i] for i in range(len(dataset))]
    pad = SpecialTokens.from_tokenizer(tokenizer).pad

    results = []
    for packing in (False, True):
        batch = DataCollator(pad, packing=packing)(items)
        assert ("attention_mask" in batch) is not packing
        model.zero_grad()
        count = (batch["labels"][:, 1:] != -100).sum()
        loss = model(data=batch["data"], labels=batch["labels"], attention_mask=batch.get("attention_mask"), num_items_in_batch=count).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (padded_loss, padded_grads), (packed_loss, packed_grads) = results
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
