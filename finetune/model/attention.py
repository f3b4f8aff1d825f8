"""Per-sample attention for packed sequences ("varlen" attention): the LLM's packed rows, the vision tower's strips.

A packed row holds several samples one after another, position_ids restarting at 0 for each. transformers'
`sdpa` attends such a row densely under a block-diagonal mask: with k samples of a row it computes about k
times the attention needed, and an arbitrary mask keeps SDPA off its flash kernel. `varlen` attends each
sample on its own instead: the row is cut at every position id 0 into segments (cumulative lengths
`cu_seq_lens`, computed once per forward in `MiniCPMV.forward`), and

- on CUDA in bf16/fp16, one call of the flash-attention kernel that ships with torch (its variable-length
  entry, `aten._flash_attention_forward` with cumulative lengths) attends all segments, causally, grouped
  query heads included; no flash-attn package is needed. That kernel needs an Ampere or newer GPU (compute
  capability 8.0+): finetune.py defaults to varlen only there (`flash_capable`);
- anywhere else (CPU, fp32), each segment runs through `scaled_dot_product_attention` on its own.

Both are exact: a token sees the tokens of its own sample up to itself, as under the block-diagonal mask.
In padding mode (packing off) the padding positions (position id 0 each) become one-token segments of their
own, so real tokens never see them, as under the padding mask. Without `cu_seq_lens` (generation with a KV
cache) the call is plain `sdpa`, with the mask transformers builds for it.

The vision tower's image strips are the same problem without causality: padded to the longest strip of the
call, they were attended under a patch mask (the masked kernel again). With varlen the unmasked patches of
all strips are packed into one sequence (`MiniCPMV._vision_tower`) and each strip is attended on its own,
bidirectionally (the attention module's `is_causal` is False), by the same kernel.

`tests/test_fast_paths.py` checks loss and gradients against `sdpa` on packed multimodal batches.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import nn
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from .kernels import native_model

VARLEN = "varlen"
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


# --- segments of a packed row -----------------------------------------------------------------------------


def packed_segments(position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Cumulative segment lengths over the flattened [B, T] rows (int32, [n_segments + 1], starting at 0) and
    the longest segment. A segment starts at every position id 0 and at every row start; with a padding mask
    ([B, T], 0 on padding), also at every padding token and at the first token after one, so that padding is
    never attended, wherever it sits (the collator pads on the right with position id 0, which needs no mask)."""
    rows, width = position_ids.shape
    starts = position_ids.reshape(-1) == 0
    if attention_mask is not None and attention_mask.dim() == 2:
        padding = attention_mask.reshape(-1).to(starts.device) == 0
        starts |= padding
        starts[1:] |= padding[:-1]
    starts[::width] = True
    boundaries = torch.cat([starts.nonzero().flatten(), torch.tensor([rows * width], device=position_ids.device)])
    cu_seq_lens = boundaries.to(torch.int32)
    return cu_seq_lens, int((boundaries[1:] - boundaries[:-1]).max())


def varlen_kwargs(position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
    """The keyword arguments that reach every attention call of the LLM (transformers' flash-attention names)."""
    cu_seq_lens, longest = packed_segments(position_ids, attention_mask)
    return {
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": longest,
        "max_length_k": longest,
    }


# --- the flash kernel's variable-length entry as a custom op (opaque to torch.compile, with its backward) ----


@torch.library.custom_op("minicpmv::varlen_flash_attention", mutates_args=())
def _flash_forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor, max_length: int, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    output, logsumexp, *_ = torch.ops.aten._flash_attention_forward(
        query, key, value, cu_seq_lens, cu_seq_lens, max_length, max_length, 0.0, causal, False, scale=scale
    )
    return output, logsumexp


@_flash_forward.register_fake
def _(query, key, value, cu_seq_lens, max_length, scale, causal):
    return torch.empty_like(query), query.new_empty((query.shape[1], query.shape[0]), dtype=torch.float32)


@torch.library.custom_op("minicpmv::varlen_flash_attention_backward", mutates_args=())
def _flash_backward(
    grad_output: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor,
    logsumexp: torch.Tensor, cu_seq_lens: torch.Tensor, max_length: int, scale: float, causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    unused = torch.empty(0, device=query.device)  # dropout's random state: no dropout here
    grads = torch.ops.aten._flash_attention_backward(
        grad_output, query, key, value, output, logsumexp, cu_seq_lens, cu_seq_lens, max_length, max_length,
        0.0, causal, unused, unused, scale=scale,
    )  # fmt: skip
    return tuple(grad.contiguous() for grad in grads)


@_flash_backward.register_fake
def _(grad_output, query, key, value, output, logsumexp, cu_seq_lens, max_length, scale, causal):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _setup_context(ctx, inputs, output) -> None:
    query, key, value, cu_seq_lens, max_length, scale, causal = inputs
    ctx.save_for_backward(query, key, value, output[0], output[1], cu_seq_lens)
    ctx.max_length, ctx.scale, ctx.causal = max_length, scale, causal


def _backward(ctx, grad_output, _grad_logsumexp):
    query, key, value, output, logsumexp, cu_seq_lens = ctx.saved_tensors
    grads = _flash_backward(
        grad_output.contiguous(),
        query,
        key,
        value,
        output,
        logsumexp,
        cu_seq_lens,
        ctx.max_length,
        ctx.scale,
        ctx.causal,
    )
    return *grads, None, None, None, None


_flash_forward.register_autograd(_backward, setup_context=_setup_context)


# --- the attention function transformers calls --------------------------------------------------------------


def _segment_by_segment(query, key, value, cu_seq_lens: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """[T, H, D] packed tokens -> each segment attended on its own with SDPA (the path off CUDA / in fp32)."""
    bounds = cu_seq_lens.tolist()
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=False):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
        outputs.append(
            nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=causal, scale=scale, enable_gqa=True
            ).transpose(0, 1)
        )
    return torch.cat(outputs)


class Segments(NamedTuple):
    """The vision tower's strips, packed one after another: what `MiniCPMV.vision_features` hands its encoder in
    place of an attention mask. transformers' vision attention passes its mask, and nothing else, on to the
    attention function, so the segments travel in that slot."""

    cu_seq_lens: torch.Tensor
    max_length: int


def varlen_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query [B, H, T, D], key/value [B, H_kv, T, D] in; the output
    [B, T, H, D] and no attention weights out. The LLM's segments come as `cu_seq_lens_q` / `max_length_q`
    (causal), the vision tower's as `Segments` in the mask's place (bidirectional: `module.is_causal` is False)."""
    if isinstance(attention_mask, Segments):
        (cu_seq_lens_q, max_length_q), attention_mask = attention_mask, None
    if cu_seq_lens_q is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout:
        raise ValueError("varlen attention has no dropout (Llama-3's and SigLIP's attention dropout is 0)")
    batch, heads, length, head_dim = query.shape
    scale = scaling if scaling is not None else head_dim**-0.5
    causal = getattr(module, "is_causal", True)
    # [B, H, T, D] -> [B*T, H, D]: the rows one after another, each token's heads together.
    query, key, value = (t.transpose(1, 2).reshape(batch * length, t.shape[1], head_dim) for t in (query, key, value))
    if query.is_cuda and query.dtype in _FLASH_DTYPES and head_dim <= 256 and head_dim % 8 == 0:
        output, _ = _flash_forward(
            query.contiguous(), key.contiguous(), value.contiguous(), cu_seq_lens_q, max_length_q, scale, causal
        )
    else:
        output = torch.compiler.disable(_segment_by_segment)(query, key, value, cu_seq_lens_q, scale, causal)
    return output.reshape(batch, length, heads, head_dim), None


def flash_capable() -> bool:
    """Whether this process's CUDA GPU runs torch's flash kernel (compute capability 8.0+: not V100 or T4),
    asked of the process's own GPU (torchrun's LOCAL_RANK), whatever device is current."""
    if not torch.cuda.is_available():
        return False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # A launcher may show each process its own GPU only: then it is device 0.
    return torch.cuda.get_device_capability(local_rank if local_rank < torch.cuda.device_count() else 0) >= (8, 0)


def use_varlen_attention(model: nn.Module, vision: bool = True) -> None:
    """Switch the LLM of a (PEFT-wrapped) native MiniCPMV to varlen attention, and with `vision` its vision
    tower too; otherwise the vision tower keeps its own."""
    config = native_model(model).config
    if not isinstance(config.vision_config, PretrainedConfig):
        # MiniCPM-V 2.0's timm-style tower has no attention setting: it runs sdpa, each view under its own mask.
        config._attn_implementation = VARLEN
        return
    vision_choice = VARLEN if vision else config.vision_config._attn_implementation
    config._attn_implementation = {"": VARLEN, "vision_config": vision_choice}
    set_vision_attention(model, vision_choice)


def set_vision_attention(model: nn.Module, implementation: str) -> None:
    """The vision tower's attention implementation, in every config its layers read: a trained vision tower is a
    PEFT modules_to_save copy, made by deepcopy, whose layers read a copy of the config."""
    native = native_model(model)
    native.config.vision_config._attn_implementation = implementation
    for module in native.vpm.modules():
        if isinstance(getattr(module, "config", None), type(native.config.vision_config)):
            module.config._attn_implementation = implementation


def llm_attention(model: nn.Module) -> str | None:
    """The attention implementation the LLM runs (what the model has, whatever the flags said)."""
    return native_model(model).config._attn_implementation


def vision_attention(model: nn.Module) -> str | None:
    """The attention implementation the vision tower runs (MiniCPM-V 2.0's timm-style tower: always sdpa)."""
    vision_config = native_model(model).config.vision_config
    return vision_config._attn_implementation if isinstance(vision_config, PretrainedConfig) else "sdpa"


# Registered once on import: the attention function, and sdpa's mask builder for the calls without segments.
AttentionInterface.register(VARLEN, varlen_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, sdpa_mask)
