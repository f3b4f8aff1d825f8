"""MiniCPM-2.4B, the LLM of MiniCPM-V 2.0, on transformers' Llama modules with MiniCPM's muP scalings.

transformers 5 has no class for this LLM (its `minicpm3` is the later MLA model), and the published
`modeling_minicpm.py` does not import on transformers 5. Apart from three scalings the architecture is Llama's
(RMSNorm, rotary attention with rotate-half, SiLU-gated MLP, no biases), so the modules here are Llama's with
those scalings added, under the published parameter names (`model.layers.N.self_attn.q_proj`, ...):

- input embeddings x `scale_emb` (12) when the model embeds token ids itself; a caller passing `inputs_embeds`
  (MiniCPMV, which splices image features in after scaling the token embeddings) scales them itself;
- every residual branch (attention and MLP) x `scale_depth / sqrt(num_hidden_layers)` (1.4 / sqrt(40));
- the final norm's output / (`hidden_size / dim_model_base`) (2304 / 256 = 9), the lm_head's input. It is applied
  in `MiniCPMModel`, so `last_hidden_state` is what the lm_head reads: the package's loss, which runs the lm_head
  on `llm.model`'s output (`loss.label_position_loss`), then needs no MiniCPM case.

Gradient checkpointing, sdpa / flash / varlen attention and the KV cache are Llama's, unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import LlamaDecoderLayer


class MiniCPMConfig(LlamaConfig):
    """A Llama config with MiniCPM's three muP fields (the published config.json's names)."""

    model_type = "minicpm"

    scale_emb: float = 1.0  # token embeddings x scale_emb
    scale_depth: float = 1.0  # residual branches x scale_depth / sqrt(num_hidden_layers)
    dim_model_base: int | None = None  # final hidden / (hidden_size / dim_model_base); None: no division


def residual_scale(config: LlamaConfig) -> float:
    """scale_depth / sqrt(num_hidden_layers): MiniCPM's factor on every residual branch."""
    return config.scale_depth / math.sqrt(config.num_hidden_layers)


def output_scale(config: LlamaConfig) -> float:
    """hidden_size / dim_model_base: what MiniCPM divides the final hidden state by before the lm_head."""
    return config.hidden_size / config.dim_model_base if config.dim_model_base else 1.0


class MiniCPMDecoderLayer(LlamaDecoderLayer):
    """Llama's decoder layer whose attention and MLP outputs are scaled by `residual_scale` before each is added
    to the residual stream: h + s * attn(norm1(h)), then h + s * mlp(norm2(h))."""

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.residual_scale = residual_scale(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attention, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = hidden_states + attention * self.residual_scale
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states)) * self.residual_scale


class MiniCPMModel(LlamaModel):
    """LlamaModel with MiniCPM's decoder layers, token embeddings x scale_emb (only when it embeds `input_ids`
    itself), and last_hidden_state = norm(h) / output_scale (the lm_head's input)."""

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.layers = nn.ModuleList(
            [MiniCPMDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None, **kwargs):
        if input_ids is not None and inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids) * self.config.scale_emb
            input_ids = None
        outputs = super().forward(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
        outputs.last_hidden_state = outputs.last_hidden_state / output_scale(self.config)
        return outputs


class MiniCPMForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM over MiniCPMModel (untied lm_head, published names `model.*`, `lm_head.weight`)."""

    config_class = MiniCPMConfig
    _no_split_modules = ["MiniCPMDecoderLayer"]  # (kept whole across devices, as Llama's decoder layer is)

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.model = MiniCPMModel(config)
        self.post_init()
