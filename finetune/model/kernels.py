"""Optional fast paths for MiniCPMV: liger-kernel's fused Triton kernels (LLM), regional torch.compile (both towers).

Both change how the same arithmetic is scheduled, not what is computed: tests/test_fast_paths.py checks the
loss and every gradient against the plain path on one batch (bf16 tolerance). Compiled layers run faster and
use no more memory, so finetune.py turns them on by default on CUDA; liger's kernels save memory but run
slower, so they are opt-in (the measurements, on an H200, are in bench/README.md).

- `apply_liger_kernels`: the LLM's RMSNorm, SwiGLU MLP and rotary embedding become liger-kernel's Triton
  kernels (fewer passes over the activations, less saved for backward), and the label-position loss becomes
  liger's fused linear cross-entropy (logits of a chunk live only inside the kernel, gradients are computed
  in the forward pass, so lm_head is not run again in backward). CUDA only; needs `pip install liger-kernel`.
- `compile_decoder_layers`: `torch.compile` of each decoder layer, and with `vision=True` of each vision encoder
  layer (regional compilation: inductor fuses the layer's elementwise work around the matrix multiplies; the
  Python-heavy multimodal glue around the layers, image scattering, packing, the chunked loss, stays eager).
"""

from __future__ import annotations

import importlib.util

from torch import nn

from .versions import version_of


def native_model(model: nn.Module) -> nn.Module:
    """The MiniCPMV inside a PeftModel (or the model itself)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "llm"):
        raise TypeError(f"{type(base).__name__} has no `llm`: the fast paths need the native MiniCPMV class")
    return base


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def apply_liger_kernels(model: nn.Module, fused_loss: bool = True) -> None:
    """Swap the LLM's RMSNorm / SwiGLU / RoPE for liger-kernel's, in place; with `fused_loss`, the
    label-position loss uses liger's fused linear cross-entropy (not under ZeRO-3, whose lm_head weight is
    only gathered inside lm_head's own forward)."""
    if not liger_available():
        raise ImportError("liger kernels need the liger-kernel package (pip install liger-kernel; CUDA + Triton)")
    import liger_kernel.transformers

    native = native_model(model)
    # The version's LLM has its own patch function (apply_liger_kernel_to_llama for Llama-3). RoPE is patched in
    # transformers' module of that LLM (a module-level function the attention calls); RMSNorm and the MLP are
    # patched on this instance's modules. The LLM's own loss is not used by our forward.
    version = version_of(native.config)
    if not version.liger_kernel_patch:
        raise ValueError(f"--use_liger_kernel: liger has no kernels for MiniCPM-V {version.name}'s LLM; leave it off")
    patch = getattr(liger_kernel.transformers, version.liger_kernel_patch)
    patch(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=native.llm
    )
    native.configure_runtime(loss_kernel="liger" if fused_loss else "chunked")


def tower_layers(model: nn.Module, tower: str = "llm") -> nn.ModuleList:
    """The repeated layers of the LLM ("llm") or of the vision tower ("vision"). A trained vision tower is a
    PEFT modules_to_save wrapper, whose attribute access reaches the trained copy."""
    native = native_model(model)
    if tower == "llm":
        return native.llm.model.layers
    # MiniCPM-V 2.0's timm-style tower keeps its layers as `blocks`, Idefics2's under `encoder.layers`.
    return native.vpm.blocks if hasattr(native.vpm, "blocks") else native.vpm.encoder.layers


def compile_decoder_layers(model: nn.Module, vision: bool = False, **compile_kwargs) -> int:
    """torch.compile every decoder layer of the LLM in place, and with `vision` every encoder layer of the
    vision tower; returns how many layers were compiled."""
    layers = [*tower_layers(model, "llm"), *(tower_layers(model, "vision") if vision else [])]
    for layer in layers:
        layer.compile(**compile_kwargs)
    return len(layers)


def compiled_layer_count(model: nn.Module, tower: str = "llm") -> int:
    """How many layers of the tower are compiled (what the model has, whatever the flags said)."""
    return sum(getattr(layer, "_compiled_call_impl", None) is not None for layer in tower_layers(model, tower))
