"""MiniCPMV: the version's LLM + SigLIP vision tower + perceiver resampler, on transformers' modules and torch.

The vision tower is Idefics2's (2.5, 2.6: patch strips, NaViT positions) or, for MiniCPM-V 2.0, the timm-style
ViT of `vit.py` with the query-position resampler (`ModelVersion.vision_tower`; `_vit_features`).

Parameter names and shapes equal the published checkpoint's (`llm.*`, `vpm.*`, `resampler.*`), and the call
interface is the published one: `model(data={input_ids, position_ids, pixel_values, tgt_sizes, image_bound},
**llm_kwargs)`. Numerics follow spec section 4, with one deliberate definition: a sample's vision features
are the ones it gets when run alone (how the published `chat()` runs), whatever it is batched with. Where
versions differ (LLM class, vision position grid, placeholder, feature blocks) the model reads the config's
`ModelVersion` (`versions.version_of`); one class serves every version.
"""

from __future__ import annotations

import json
import math
import os
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import PreTrainedModel, TextIteratorStreamer
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionEmbeddings, Idefics2VisionTransformer

from .attention import VARLEN, Segments, varlen_kwargs
from .chat_prompt import IMAGE_MARKER, published_decoding, render_chat_prompt
from .checkpoint import CheckpointError, validate_checkpoint_dir
from .image_processing import from_patch_strip, image_bounds, image_views, normalize_pixels, to_patch_strip
from .loss import label_position_loss
from .parallel import is_distributed, is_zero3_partitioned
from .resampler import QueryPositionResampler, Resampler, ResamplerAttention
from .runtime import RuntimeOptions
from .tokenization import SpecialTokens
from .versions import version_of
from .versions.minicpm_llama3_v2_5 import MiniCPMVConfig
from .vision import GridVisionEmbeddings, ZeroGradients, cast_residual_to_autocast_dtype, view_sizes
from .vit import VisionTransformer


class MiniCPMVPreTrainedModel(PreTrainedModel):
    # The Auto classes map model_type "minicpmv" to this config class (MiniCPM-Llama3-V-2.5's), whose from_dict
    # builds the config class of the version config.json names; the model reads everything a version decides
    # through `versions.version_of(config)`.
    config_class = MiniCPMVConfig
    base_model_prefix = "minicpmv"
    main_input_name = "input_ids"  # inside `data`; the trainer reads it there
    supports_gradient_checkpointing = True
    # Kept whole across devices; the LLM's decoder layer is its own class's (post_init gathers the children's).
    _no_split_modules = ["Idefics2EncoderLayer", "ViTBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = False
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, Resampler):
            nn.init.trunc_normal_(module.query, std=0.02)
            nn.init.normal_(module.proj, std=module.embed_dim**-0.5)
            module._pos_table.clear()
            if isinstance(module, QueryPositionResampler):
                module.pos_embed.copy_(module.query_grid_table(module.embed_dim, math.isqrt(module.num_queries)))
        elif isinstance(module, VisionTransformer):
            nn.init.trunc_normal_(module.pos_embed, std=0.02)
        elif isinstance(module, ResamplerAttention):
            nn.init.xavier_uniform_(module.in_proj_weight)
            nn.init.zeros_(module.in_proj_bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            nn.init.zeros_(module.bias)
        elif hasattr(module, "weight") and module.__class__.__name__.endswith("RMSNorm"):
            nn.init.ones_(module.weight)


class MiniCPMV(MiniCPMVPreTrainedModel):
    runtime_options: RuntimeOptions  # how training arithmetic is scheduled; change with configure_runtime

    def __init__(self, config: MiniCPMVConfig):
        super().__init__(config)
        # The LLM reads the same config object (a subclass of the LLM's config class), as in the published code,
        # so that the attention implementation chosen at load time reaches it.
        version = version_of(config)
        self.llm = version.llm_class(config)
        if version.vision_tower == "vit":  # MiniCPM-V 2.0: timm-style ViT on [3, H, W] views
            settings = config.vit_settings
            kept = settings.num_hidden_layers - 1 if config.drop_vision_last_layer else None
            self.vpm = VisionTransformer(settings, kept)
            self.resampler = QueryPositionResampler(config.query_num, config.hidden_size, settings.hidden_size)
        else:
            self.vpm = Idefics2VisionTransformer(config.vision_config)
            if version.vision_grid_from_tgt_sizes:  # the same parameters; position ids from each view's (h, w)
                self.vpm.embeddings = GridVisionEmbeddings(config.vision_config)
            if config.drop_vision_last_layer:
                self.vpm.encoder.layers = self.vpm.encoder.layers[:-1]
            self.resampler = Resampler(config.query_num, config.hidden_size, config.vision_config.hidden_size)
            self.vpm.embeddings.register_forward_hook(cast_residual_to_autocast_dtype)
        self.runtime_options = RuntimeOptions()
        self.configure_runtime()  # writes the vision option where its hook reads it
        self.post_init()

    def configure_runtime(self, **changes: Any) -> RuntimeOptions:
        """Set runtime options by name (RuntimeOptions' fields; the others keep their values) and return the
        options in effect. An unknown name is a TypeError, an invalid value a ValueError.

        The vision residual option is also written onto every vision embeddings module of the model, where its
        hook reads it: PEFT's trained copy of the vision tower carries the hook too."""
        self.runtime_options = replace(self.runtime_options, **changes)
        for module in self.modules():
            if isinstance(module, Idefics2VisionEmbeddings):
                module.residual_in_autocast_dtype = self.runtime_options.vision_residual_in_autocast_dtype
        return self.runtime_options

    # --- loading: refuse anything that would leave weights random ------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        # A local directory is checked from its safetensors headers before anything loads; any source (hub ids
        # included) is checked again from transformers' loading report, which would otherwise only warn.
        if os.path.isdir(str(pretrained_model_name_or_path)):
            validate_checkpoint_dir(pretrained_model_name_or_path, cls, kwargs.get("config"))
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        problems = [
            f"{kind.replace('_', ' ')}: {sorted(map(str, info[kind]))[:5]}"
            for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
            if info.get(kind)
        ]
        if problems:
            raise CheckpointError(f"{pretrained_model_name_or_path}: " + "; ".join(problems))
        return (model, info) if wants_info else model

    # --- training mode ---------------------------------------------------------------------------------------

    def train(self, mode: bool = True):
        """nn.Module.train, skipped when every module already is in that mode and none has a `train` of its own.

        The Trainer calls it before every training step. nn.Module.train then sets `training` on each of the
        ~2000 modules of the full-size model with LoRA through Module.__setattr__: 4.2 ms of host time on a
        2-vCPU host, while the GPU waits for the step's first kernel. Reading the flags takes 1.5 ms. A module
        with its own `train` (PEFT's DoRA layers clear a cache there) always gets the call."""
        if mode is self.training and all(
            m.training is mode and type(m).train in _PLAIN_TRAIN for m in self.modules() if m is not self
        ):
            return self
        return super().train(mode)

    # --- embeddings (PEFT and resizing go through these) ---------------------------------------------------

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.llm.set_output_embeddings(value)

    def enable_input_require_grads(self) -> None:
        """What reentrant checkpointing needs: the embeddings' output requires grad, so that a checkpointed
        block's trained parameters get their gradients. transformers hooks the input embeddings of every
        sub-model, the vision tower's included: with the vision tower frozen (LoRA only), every image's features
        then required grad, and backward ran through all 27 encoder layers, recomputation included, for
        gradients nothing uses. Here the vision tower's embeddings are marked only while it has trained
        parameters (checked at each call: a recipe may freeze or unfreeze it after this hook is set)."""
        # Called by PEFT and again by the Trainer: the earlier handles go first. (PEFT's copy of a trained vision
        # tower carries copies of hooks set before it was made, which these handles do not reach; the hooks only
        # ever set requires_grad, so a second one changes nothing.)
        self.disable_input_require_grads()

        def require_grads(module, inputs, output):
            output.requires_grad_(True)

        def require_grads_if_trained(tower, module, inputs, output):
            if any(p.requires_grad for p in tower.parameters()):
                output.requires_grad_(True)

        hooks = [self.get_input_embeddings().register_forward_hook(require_grads)]
        for tower in self.modules():  # a trained vision tower is two: the original and PEFT's trained copy
            if isinstance(tower, (Idefics2VisionTransformer, VisionTransformer)):
                embeddings = tower.patch_embed if isinstance(tower, VisionTransformer) else tower.embeddings
                hooks.append(embeddings.register_forward_hook(partial(require_grads_if_trained, tower)))
        self._require_grads_hooks = hooks

    # --- vision --------------------------------------------------------------------------------------------

    def _as_strip(self, view: torch.Tensor) -> torch.Tensor:
        """Accept the published [3, p, L*p] strip, or a [3, H, W] view (re-laid into a strip)."""
        patch = self.config.patch_size
        return view if view.shape[1] == patch else to_patch_strip(view, patch)

    @property
    def _has_vit_tower(self) -> bool:
        """Whether the vision tower is the timm-style ViT (MiniCPM-V 2.0), read from the version, not the module:
        PEFT wraps a trained tower in a modules_to_save wrapper."""
        return version_of(self.config).vision_tower == "vit"

    def _vision_weight(self) -> torch.Tensor:
        """The vision tower's first weight: the device and dtype its input is given in."""
        if self._has_vit_tower:
            return self.vpm.patch_embed.proj.weight
        return self.vpm.embeddings.patch_embedding.weight

    def vision_features(
        self, pixel_values: list[list[torch.Tensor]], tgt_sizes: Sequence[Any] | torch.Tensor | None
    ) -> list[torch.Tensor]:
        """Per sample, [n_views, query_num, hidden]; an empty tensor for a sample without images.

        Views and sizes are matched as the published `get_vllm_embedding` matches them: the views of all samples,
        in order over the samples' pixel_values lists, take the rows of the concatenated tgt_sizes in order
        (`view_sizes`). So tgt_sizes may hold one [n_i, 2] per sample (the suite's collator, `prepare_inputs`) or
        leave out the samples without images (the published collator); empty entries add no rows. Counts that
        disagree, or a size whose patch count is not its view's, raise ValueError: matching them any other way
        would silently give one sample another sample's image.

        The published vision tower pads every strip of a call to the call's longest strip and attends over
        that padding (its patch mask ends up all True), so a sample's features depend on its batch. We define
        the reference as the sample alone: each strip is padded to its own sample's longest strip L_i (those
        zero patches take part, as when the sample runs alone), and a patch mask hides everything beyond L_i,
        which also gives NaViT position ids for a 1 x L_i grid. All views of the call then run in ONE vision
        tower call, which keeps ZeRO-3's parameter gathering in step across ranks.

        Versions whose tower is given each view's grid (`vision_grid_from_tgt_sizes`, MiniCPM-V 2.6, as its
        published code does) mask every view beyond its own h * w patches and take the position ids of its
        (h, w) grid: there a view's features never depend on the other views of the call.
        """
        if self._has_vit_tower:
            return self._vit_features(pixel_values, tgt_sizes)
        grid_positions = version_of(self.config).vision_grid_from_tgt_sizes
        weight = self._vision_weight()
        patch = self.config.patch_size
        strips, own_length, counts = [], [], []
        for views in pixel_values:
            sample_strips = [self._as_strip(v) for v in views]
            counts.append(len(sample_strips))
            if not sample_strips:
                continue
            longest = max(s.shape[-1] for s in sample_strips) // patch
            strips += sample_strips
            own_length += [s.shape[-1] // patch if grid_positions else longest for s in sample_strips]
        sizes = view_sizes(tgt_sizes, [s.shape[-1] // patch for s in strips], counts)
        empty = torch.zeros(0, self.config.query_num, self.config.hidden_size, dtype=weight.dtype, device=weight.device)
        if not strips:
            return [empty for _ in counts]

        length = max(own_length)
        batch = torch.zeros(len(strips), 3, patch, length * patch, dtype=weight.dtype, device=weight.device)
        for j, strip in enumerate(strips):
            # uint8 strips (the training data path) are normalised here, on the model's device.
            batch[j, :, :, : strip.shape[-1]] = normalize_pixels(strip.to(weight.device)).to(weight.dtype)
        lengths = torch.tensor(own_length, device=weight.device)
        patch_mask = (torch.arange(length, device=weight.device)[None, :] < lengths[:, None])[:, None, :]
        hidden = self._vision_tower(batch, patch_mask, sizes if grid_positions else None)
        queries = self.resampler(hidden, sizes)
        return list(queries.split(counts))  # a sample without images gets a [0, Q, D] tensor

    def _vision_tower(
        self, batch: torch.Tensor, patch_mask: torch.Tensor, tgt_sizes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`self.vpm(batch, patch_attention_mask=patch_mask).last_hidden_state`, with `tgt_sizes` ([N, 2]) the
        position ids of each view's (h, w) grid (`GridVisionEmbeddings`). With varlen attention the unmasked
        patches of all images are packed one after another ([1, n, D]) and each image is attended on its own,
        instead of every image padded to the longest under a mask: the same numbers on the unmasked patches;
        the masked ones come back as zeros (the resampler never reads them)."""
        varlen = self.config.vision_config._attn_implementation == VARLEN
        if not varlen and tgt_sizes is None:
            return self.vpm(batch, patch_attention_mask=patch_mask).last_hidden_state
        grid = {} if tgt_sizes is None else {"tgt_sizes": tgt_sizes}
        hidden = self.vpm.embeddings(pixel_values=batch, patch_attention_mask=patch_mask, **grid)
        keep = patch_mask.reshape(len(batch), -1)
        if not varlen:  # what vpm.forward does after its embeddings
            mask = create_bidirectional_mask(config=self.vpm.config, inputs_embeds=hidden, attention_mask=keep)
            return self.vpm.post_layernorm(
                self.vpm.encoder(inputs_embeds=hidden, attention_mask=mask).last_hidden_state
            )
        lengths = keep.sum(1)
        cu_seq_lens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        packed = self.vpm.encoder(
            inputs_embeds=hidden[keep][None], attention_mask=Segments(cu_seq_lens, int(lengths.max()))
        ).last_hidden_state
        packed = self.vpm.post_layernorm(packed)
        return packed.new_zeros(hidden.shape).masked_scatter(keep[..., None], packed[0])

    def _vit_features(
        self, pixel_values: list[list[torch.Tensor]], tgt_sizes: Sequence[Any] | torch.Tensor | None
    ) -> list[torch.Tensor]:
        """`vision_features` of the timm-style tower (MiniCPM-V 2.0): per sample [n_views, query_num, hidden].

        A view is a [3, H, W] image (the published interface, no tgt_sizes: its grid is ceil(H/p) x ceil(W/p)),
        or, with tgt_sizes given (the suite's data path and `prepare_inputs`), a [3, p, h*w*p] patch strip that
        is laid back into its [3, h*p, w*p] image first (a [3, p, W] view reads the same either way). Each
        view's features are what it gets alone (`vit.VisionTransformer`, `QueryPositionResampler`); all views
        of the call run in one tower call and one resampler call, padded into a common patch frame."""
        weight = self._vision_weight()
        patch = self.config.patch_size
        views = [view for sample in pixel_values for view in sample]
        counts = [len(sample) for sample in pixel_values]
        empty = torch.zeros(0, self.config.query_num, self.config.hidden_size, dtype=weight.dtype, device=weight.device)
        if not views:
            return [empty for _ in counts]
        if _has_size_rows(tgt_sizes):
            strip_patches = [
                v.shape[-1] // patch if v.shape[1] == patch else math.prod(self.vpm.grid_of(*v.shape[-2:]))
                for v in views
            ]
            sizes = view_sizes(tgt_sizes, strip_patches, counts).tolist()
            views = [
                from_patch_strip(v, h, w) if v.shape[1] == patch else v for v, (h, w) in zip(views, sizes, strict=True)
            ]
        grids = [self.vpm.grid_of(*view.shape[-2:]) for view in views]
        frame = (max(h for h, _ in grids), max(w for _, w in grids))
        batch = torch.zeros(len(views), 3, frame[0] * patch, frame[1] * patch, dtype=weight.dtype, device=weight.device)
        for j, view in enumerate(views):
            batch[j, :, : view.shape[1], : view.shape[2]] = normalize_pixels(view.to(weight.device)).to(weight.dtype)
        queries = self.resampler(self.vpm(batch, grids), grids, frame)
        return list(queries.split(counts))

    def _dummy_vision_feature(self) -> torch.Tensor:
        """What the published code runs when a training call has no image: an all-zero 224 x 224 image."""
        weight = self._vision_weight()
        dummy = torch.zeros(1, 3, 224, 224, dtype=weight.dtype, device=weight.device)
        side = 224 // self.config.patch_size
        if self._has_vit_tower:
            return self.resampler(self.vpm(dummy, [(side, side)]), [(side, side)], (side, side))
        sizes = torch.tensor([[side, side]], dtype=torch.int64, device=weight.device)
        every_patch = torch.ones(1, side, side, dtype=torch.bool, device=weight.device)
        grid = sizes if version_of(self.config).vision_grid_from_tgt_sizes else None
        return self.resampler(self._vision_tower(dummy, every_patch, grid), sizes)

    # --- the published interface ----------------------------------------------------------------------------

    def get_vllm_embedding(self, data: dict[str, Any]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Text embeddings with each sample's view features written over its image_bound positions."""
        input_ids = data["input_ids"]
        if data.get("vision_hidden_states") is not None:
            vision_hidden_states = data["vision_hidden_states"]
        else:
            vision_hidden_states = self.vision_features(data["pixel_values"], data.get("tgt_sizes"))

        # A training call without any image still runs the vision tower once in the published code, on an
        # all-zero image whose features enter as `features.mean() * 0`: every trained vision parameter gets an
        # all-zero gradient (AdamW then still moves it by its momentum and weight decay, as upstream). Under
        # torch.distributed the ranks must run the same modules (ZeRO-3 gathers in step, before the LLM), so
        # the dummy image runs there, trained or not. In a single process only its gradients matter, and
        # ZeroGradients gives exactly those without running the tower, whose 27 layers forward and backward
        # would be host and GPU time spent on arithmetic that is multiplied by zero.
        vision_zero = None
        if all(len(f) == 0 for f in vision_hidden_states):
            if is_distributed():
                vision_zero = self._dummy_vision_feature().mean() * 0
            elif self.training:
                trained = [p for p in self._vision_parameters() if p.requires_grad]
                # (ZeRO-3, even on one GPU, holds partitioned parameters: only a real forward gathers them.)
                if trained and self.runtime_options.dummy_image_stand_in and not is_zero3_partitioned(trained):
                    vision_zero = ZeroGradients.apply(*trained)
                elif trained:
                    vision_zero = self._dummy_vision_feature().mean() * 0

        embeddings = self.llm.get_input_embeddings()(input_ids)
        if getattr(self.config, "scale_emb", None):  # MiniCPM-V 2.0's LLM scales embeddings; Llama-3 does not
            embeddings = embeddings * self.config.scale_emb
        # Packed batches (finetune.dataset packing mode) list images per original sample, with the row and
        # start offset of each sample; unpacked batches have one entry per row and offset 0.
        rows = data.get("row_of_sample")
        offsets = data.get("sample_offsets")
        flat_rows, flat_positions, flat_features = [], [], []
        for index, features in enumerate(vision_hidden_states):
            bounds = torch.as_tensor(data["image_bound"][index]).reshape(-1, 2)
            if not len(bounds):
                continue
            row = int(rows[index]) if rows is not None else index
            offset = int(offsets[index]) if offsets is not None else 0
            positions = torch.cat([torch.arange(s, e) for s, e in bounds.tolist()]) + offset
            features = features.reshape(-1, features.shape[-1])
            if len(positions) != len(features):
                raise ValueError(
                    f"sample {index}: image_bound covers {len(positions)} positions but its views give "
                    f"{len(features)} features"
                )
            flat_rows.append(torch.full_like(positions, row))
            flat_positions.append(positions)
            flat_features.append(features)
        if flat_features:
            index = (torch.cat(flat_rows).to(embeddings.device), torch.cat(flat_positions).to(embeddings.device))
            # Written over, not added (published semantics); out of place so autograd sees both paths.
            embeddings = embeddings.index_put(index, torch.cat(flat_features).to(embeddings.dtype))

        if vision_zero is not None:
            embeddings = embeddings + vision_zero.to(embeddings.dtype)
        return embeddings, vision_hidden_states

    def _vision_parameters(self):
        yield from self.vpm.parameters()
        yield from self.resampler.parameters()

    def forward(
        self,
        data: dict[str, Any] | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        return_logits: bool = False,
        **kwargs,
    ):
        """Returns the LLM's output. With `labels`, the loss is computed on label positions only (the full
        [tokens, vocab] logits are never materialised) unless `return_logits=True`, which runs the plain
        LlamaForCausalLM loss. Both divide the summed token loss by `num_items_in_batch` when given (the
        Trainer's count of label tokens in the whole optimizer step), else take the mean."""
        if data is None:  # allow model(**batch) where the batch carries the published fields at top level
            data = {k: kwargs.pop(k) for k in list(kwargs) if k in _DATA_KEYS}
        inputs_embeds, _ = self.get_vllm_embedding(data)
        position_ids = data.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).expand(
                inputs_embeds.shape[0], -1
            )
        if self.config._attn_implementation == VARLEN:  # each sample of a packed row attended on its own
            kwargs.update(varlen_kwargs(position_ids, kwargs.get("attention_mask")))
        if labels is None or return_logits:
            if labels is not None:
                kwargs.update(labels=labels, num_items_in_batch=num_items_in_batch)
            return self.llm(inputs_embeds=inputs_embeds, position_ids=position_ids, **kwargs)

        kwargs.pop("use_cache", None)
        hidden = self.llm.model(inputs_embeds=inputs_embeds, position_ids=position_ids, use_cache=False, **kwargs)
        options = self.runtime_options
        loss = label_position_loss(
            hidden.last_hidden_state, labels, self.llm.lm_head, num_items_in_batch, options.loss_chunk_size,
            fused=options.loss_kernel == "liger", vocab_shards=options.vocab_sharded_loss,
        )  # fmt: skip
        return CausalLMOutputWithPast(loss=loss)

    # --- inference ------------------------------------------------------------------------------------------

    def chat(self, image, msgs, *args, **kwargs):
        """The published `chat()` of the checkpoint's version, as its model card calls it:

        - MiniCPM-Llama3-V 2.5 and MiniCPM-V 2.6: `chat(image, msgs, tokenizer, processor=None,
          vision_hidden_states=None, max_new_tokens, min_new_tokens=0, sampling=True, max_inp_length,
          system_prompt="", stream=False, max_slice_nums=None, use_image_id=None, **generation_kwargs)` returns
          the answer, a generator of its text pieces with stream=True, or a list of answers when `msgs` is a
          list of conversations (`answer_chat`).
        - MiniCPM-V 2.0: `chat(image, msgs, context, tokenizer, vision_hidden_states=None, max_new_tokens=1024,
          sampling=True, max_inp_length=2048, **kwargs)` returns (answer, context, generation_config)
          (`chat_with_context`).

        The version's `ModelVersion.chat_returns_context` says which; both methods can also be called by name."""
        if version_of(self.config).chat_returns_context:
            return self.chat_with_context(image, msgs, *args, **kwargs)
        return self.answer_chat(image, msgs, *args, **kwargs)

    @torch.inference_mode()
    def answer_chat(
        self,
        image: Image.Image | list[Image.Image] | None,
        msgs: list[dict[str, Any]] | list[list[dict[str, Any]]] | str,
        tokenizer,
        processor=None,
        vision_hidden_states: list[torch.Tensor] | None = None,
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
        sampling: bool = True,
        max_inp_length: int | None = None,
        system_prompt: str = "",
        stream: bool = False,
        max_slice_nums: int | None = None,
        use_image_id: bool | None = None,
        streamer=None,
        **generation_kwargs,
    ) -> str | list[str] | Iterator[str]:
        """The published chat() of 2.5 and 2.6: messages (content a str, or a list of str and PIL images; `image`
        goes before the first user content; `msgs` may be JSON text) -> the answer.

        - `stream=True`: a generator of text pieces whose join is the answer; needs sampling=True (the
          published chat() asserts it: beam search cannot stream). `streamer` takes a transformers streamer
          instead (this package's command line uses one).
        - `msgs` a list of conversations: a list of answers, each conversation answered on its own (its answer
          does not depend on the batch); `image` must then be None, each conversation's images in its content.
        - `max_slice_nums`, `use_image_id`: this call's slicing and image ids (the published 2.6 processor's
          per-call settings; None: the checkpoint's); `use_image_id=True` is refused on a version without ids.
        - Decoding: `published_decoding` (sampling or 3-beam defaults, `min_new_tokens`, the keyword arguments
          over them); max_new_tokens and max_inp_length default to the version's published values.
        - `processor` is accepted and not used: the model's own `prepare_inputs` is the processor, set from the
          checkpoint's config. `vision_hidden_states`: a list with each conversation's [n_views, query_num,
          hidden] image features, used instead of running the vision tower on its images.
        """
        answer, _ = self._respond(
            image, msgs, tokenizer, vision_hidden_states, max_new_tokens, min_new_tokens, sampling, max_inp_length,
            system_prompt, stream, max_slice_nums, use_image_id, streamer, generation_kwargs,
        )  # fmt: skip
        return answer

    @torch.inference_mode()
    def chat_with_context(
        self,
        image: Image.Image | None,
        msgs: list[dict[str, Any]] | str,
        context: Any,
        tokenizer,
        vision_hidden_states: list[torch.Tensor] | None = None,
        max_new_tokens: int | None = None,
        sampling: bool = True,
        max_inp_length: int | None = None,
        **kwargs,
    ) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
        """The published chat() of MiniCPM-V 2.0: (answer, context, generation_config), where context is `msgs`
        followed by the answer as an assistant turn (the next call's `msgs` continues from it) and
        generation_config the decoding settings used (`published_decoding`). The `context` argument is taken
        and not read, as in the published code: the conversation is `msgs`. Other keyword arguments are
        `answer_chat`'s (system_prompt, min_new_tokens, max_slice_nums, generation arguments); the published
        2.0 has no streaming, so stream=True is refused, as is a list of conversations."""
        if kwargs.pop("stream", False):
            raise ValueError(
                "chat(stream=True): MiniCPM-V 2.0's chat() does not stream (it returns (answer, context, "
                "generation_config)); leave stream out"
            )
        msgs = json.loads(msgs) if isinstance(msgs, str) else msgs
        if msgs and isinstance(msgs[0], list):
            raise ValueError("chat: MiniCPM-V 2.0's chat() answers one conversation; msgs must be a list of messages")
        options = {name: kwargs.pop(name) for name in _CHAT_OPTIONS if name in kwargs}
        answer, config = self._respond(
            image, msgs, tokenizer, vision_hidden_states, max_new_tokens, options.get("min_new_tokens", 0), sampling,
            max_inp_length, options.get("system_prompt", ""), False, options.get("max_slice_nums"),
            options.get("use_image_id"), options.get("streamer"), kwargs,
        )  # fmt: skip
        return answer, [*msgs, {"role": "assistant", "content": answer}], config

    def _respond(
        self,
        image: Image.Image | list[Image.Image] | None,
        msgs: list[dict[str, Any]] | list[list[dict[str, Any]]] | str,
        tokenizer,
        vision_hidden_states: list[torch.Tensor] | None,
        max_new_tokens: int | None,
        min_new_tokens: int,
        sampling: bool,
        max_inp_length: int | None,
        system_prompt: str,
        stream: bool,
        max_slice_nums: int | None,
        use_image_id: bool | None,
        streamer,
        generation_kwargs: dict[str, Any],
    ) -> tuple[str | list[str] | Iterator[str], dict[str, Any]]:
        """What both chat() forms do: check the call, render and tokenize every conversation (bad input fails
        here, before any generation), then generate. Returns (answer(s) or stream, decoding settings)."""
        version = version_of(self.config)
        msgs = json.loads(msgs) if isinstance(msgs, str) else msgs
        batched = bool(msgs) and isinstance(msgs[0], list)
        if batched and image is not None:
            raise ValueError(
                "chat: msgs is a list of conversations, so image must be None: put each conversation's images "
                "in its msgs content"
            )
        if stream and not sampling:
            raise ValueError(
                "chat(stream=True) needs sampling=True: beam search (sampling=False) cannot stream, as in the "
                "published chat(); for a greedy stream pass sampling=True, top_k=1"
            )
        if stream and (batched or streamer is not None):
            raise ValueError("chat(stream=True) streams one conversation, and takes no streamer of its own")
        conversations = msgs if batched else [msgs]
        tokens = SpecialTokens.from_tokenizer(tokenizer)  # reads the whole vocabulary: once per call
        inputs = []
        for index, conversation in enumerate(conversations):
            prompt, images = render_chat_prompt(None if batched else image, conversation, tokenizer, system_prompt)
            data = self.prepare_inputs(
                prompt, images, tokenizer, max_inp_length or version.chat_max_inp_length, tokens, max_slice_nums,
                use_image_id,
            )  # fmt: skip
            if vision_hidden_states is not None:  # the published form: one entry per conversation
                data["vision_hidden_states"] = [vision_hidden_states[index]]
            inputs.append(data)
        config = published_decoding(sampling, min_new_tokens, **generation_kwargs)
        max_new_tokens = max_new_tokens or version.chat_max_new_tokens
        if stream:
            return self._stream_answer(inputs[0], tokens, tokenizer, max_new_tokens, config), config
        answers = [
            _decoded_answer(self._generate(data, tokens, max_new_tokens, streamer, config), tokenizer)
            for data in inputs
        ]
        return (answers if batched else answers[0]), config

    @torch.inference_mode()
    def generate_text(
        self,
        prompt: str,
        images: list[Image.Image],
        tokenizer,
        max_new_tokens: int = 1024,
        streamer=None,
        max_inp_length: int | None = None,
        **generation_config,
    ) -> str:
        """What `chat()` does once it has its prompt: placeholders, vision features, llm.generate, decode."""
        tokens = SpecialTokens.from_tokenizer(tokenizer)
        data = self.prepare_inputs(prompt, list(images), tokenizer, max_inp_length, tokens)
        return _decoded_answer(self._generate(data, tokens, max_new_tokens, streamer, generation_config), tokenizer)

    def _generate(
        self, data: dict, tokens: SpecialTokens, max_new_tokens: int, streamer, generation_config: dict[str, Any]
    ) -> torch.Tensor:
        """llm.generate from `prepare_inputs`' data (one prompt): [1, new tokens] ids."""
        inputs_embeds, _ = self.get_vllm_embedding(data)
        with warnings.catch_warnings():
            # Generating from embeddings alone, the repetition penalty sees only the new tokens: so did the
            # published chat(), whose sampling default (1.05) would otherwise print this in every answer.
            warnings.filterwarnings(
                "ignore", message=r"Passing `repetition_penalty` with `inputs_embeds`", category=UserWarning
            )
            return self.llm.generate(
                inputs_embeds=inputs_embeds,
                attention_mask=torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device),
                max_new_tokens=max_new_tokens,
                pad_token_id=tokens.pad,
                eos_token_id=tokens.stop_ids,
                streamer=streamer,
                **generation_config,
            )

    def _stream_answer(
        self, data: dict, tokens: SpecialTokens, tokenizer, max_new_tokens: int, generation_config: dict[str, Any]
    ) -> Iterator[str]:
        """Generate in a thread (as the published chat() streams) and return the generator of the answer's text
        pieces; an error raised while generating is raised again by the generator once the pieces stop."""
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def generate() -> None:
            try:
                with torch.inference_mode():
                    self._generate(data, tokens, max_new_tokens, streamer, generation_config)
            except BaseException as error:  # handed to the consumer's thread
                errors.append(error)
                streamer.end()

        thread = threading.Thread(target=generate, daemon=True)
        thread.start()

        def pieces() -> Iterator[str]:
            yield from stripped_pieces(streamer)
            thread.join()
            if errors:
                raise errors[0]

        return pieces()

    def prepare_inputs(
        self,
        prompt: str,
        images: list[Image.Image],
        tokenizer,
        max_length: int | None = None,
        tokens: SpecialTokens | None = None,
        max_slice_nums: int | None = None,
        use_image_id: bool | None = None,
    ) -> dict:
        """The published processor: replace each marker with its image's placeholder, tokenize, find bounds.

        `max_slice_nums` and `use_image_id` override the checkpoint's slicing and the version's image ids for
        this prompt, as the published 2.6 processor's arguments do (None keeps them); image ids only exist
        where the version has them, so use_image_id=True elsewhere is a ValueError."""
        settings = self.config.slice_settings
        version = version_of(self.config)
        if max_slice_nums is not None:
            if max_slice_nums < 1:
                raise ValueError(f"max_slice_nums must be at least 1, got {max_slice_nums}")
            settings = replace(settings, max_slice_nums=max_slice_nums)
        if use_image_id and not version.uses_image_id:
            raise ValueError(f"use_image_id=True: MiniCPM-V {version.name}'s image placeholders have no image ids")
        with_ids = version.uses_image_id if use_image_id is None else use_image_id
        pieces = prompt.split(IMAGE_MARKER)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"prompt has {len(pieces) - 1} image markers but {len(images)} images were given")
        text, pixel_values, sizes = pieces[0], [], []
        unk = tokenizer.unk_token or "<unk>"
        for index, (image, rest) in enumerate(zip(images, pieces[1:], strict=True)):
            strips, tgt, plan = image_views(image, settings)
            pixel_values += strips
            sizes.append(tgt)
            text += version.image_placeholder(plan, settings.query_num, unk, index if with_ids else None) + rest
        ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
        if max_length is not None and len(ids) > max_length:
            raise ValueError(f"prompt is {len(ids)} tokens, over max_inp_length={max_length}")
        tokens = tokens or SpecialTokens.from_tokenizer(tokenizer)  # reads the whole vocabulary: once per call
        device = self.llm.device
        dtype = self._vision_weight().dtype
        return {
            "input_ids": ids[None].to(device),
            "position_ids": torch.arange(len(ids), device=device)[None],
            "pixel_values": [[p.to(device=device, dtype=dtype) for p in pixel_values]],
            "tgt_sizes": [torch.cat(sizes) if sizes else torch.zeros(0, 2, dtype=torch.int64)],
            "image_bound": [image_bounds(ids, *tokens.feature_block_ids(version))],
        }


def _decoded_answer(output: torch.Tensor, tokenizer) -> str:
    """The answer text of llm.generate's [1, new tokens] ids: special tokens left out, whitespace stripped."""
    return tokenizer.decode(output[0], skip_special_tokens=True).strip()


def stripped_pieces(pieces: Iterable[str]) -> Iterator[str]:
    """Streamed text pieces whose join is the stripped join of `pieces` (what the non-streamed answer is):
    leading whitespace is dropped, trailing whitespace held back until more text follows it; empty pieces are
    left out."""
    started, held = False, ""
    for piece in pieces:
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        text = held + piece
        body = text.rstrip()
        held = text[len(body) :]
        if body:
            yield body


def _has_size_rows(tgt_sizes: Sequence[Any] | torch.Tensor | None) -> bool:
    """Whether tgt_sizes gives any (h, w) row (the published 2.0 interface passes none, or empty lists)."""
    if tgt_sizes is None:
        return False
    entries = [tgt_sizes] if torch.is_tensor(tgt_sizes) else [entry for entry in tgt_sizes if entry is not None]
    return any(torch.as_tensor(entry).numel() for entry in entries)


# The `train` methods that only set the flag (PreTrainedModel's also recasts kernels, on a change of mode only).
_PLAIN_TRAIN = (nn.Module.train, PreTrainedModel.train)

_DATA_KEYS = (
    "input_ids", "position_ids", "pixel_values", "tgt_sizes", "image_bound", "vision_hidden_states",
    "row_of_sample", "sample_offsets",
)  # fmt: skip

# chat() arguments of 2.5 / 2.6 that MiniCPM-V 2.0's chat() passes on as keyword arguments (not generation ones).
_CHAT_OPTIONS = ("min_new_tokens", "system_prompt", "max_slice_nums", "use_image_id", "streamer", "processor")
