"""Padding-free packing gives the same loss and gradients as right-padded batches (the fast path keeps numerics)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import finetune  # noqa: F401
from finetune.dataset import DataCollator, DataSettings, SupervisedDataset
from finetune.model import MiniCPMVConfig
from finetune.model.tokenization import SpecialTokens


@pytest.fixture(params=["2.5", "2.6"])
def checkpoint_and_samples(request, golden_dir, tmp_path_factory):
    """(checkpoint, dataset items, pad id) of each version's golden tiny checkpoint: one image, text only, two
    images over two turns (`mixed_samples` for 2.5; the same conversations on tests/golden_tiny_v2_6 for 2.6)."""
    if request.param == "2.5":
        return (golden_dir, *request.getfixturevalue("mixed_samples")[1:])
    golden = Path(__file__).resolve().parent / "golden_tiny_v2_6"
    images = golden / "images"
    samples = [
        {"id": "wide", "image": str(images / "wide_260x150.png"),
         "conversations": [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A wide picture of things."}]},
        {"id": "text", "conversations": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]},
        {"id": "two", "image": {"<image_00>": str(images / "tall_120x330.png"), "<image_01>": str(images / "small_90x70.png")},
         "conversations": [{"role": "user", "content": "<image_00> and <image_01>: which is taller?"}, {"role": "assistant", "content": "The first."},
                           {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]},
    ]  # fmt: skip
    path = tmp_path_factory.mktemp("mixed_v2_6") / "data.json"
    path.write_text(json.dumps(samples))
    checkpoint = golden / "checkpoint"
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    dataset = SupervisedDataset(DataSettings(str(path)), tokenizer, MiniCPMVConfig.from_pretrained(checkpoint))
    return checkpoint, [dataset[i] for i in range(len(dataset))], SpecialTokens.from_tokenizer(tokenizer).pad


@pytest.mark.slow
def test_packed_and_padded_batches_have_equal_loss_and_gradients(checkpoint_and_samples):
    checkpoint, items, pad = checkpoint_and_samples
    model = AutoModel.from_pretrained(checkpoint, attn_implementation="sdpa").train()

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
