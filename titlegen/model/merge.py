"""Fold a LoRA adapter into a dense copy of its (4-bit) base: a plain transformers model with no per-step
dequantization, for fast prediction and for export as a standard model directory."""

from __future__ import annotations

import torch

from titlegen.model.lora import unwrap


def merge_into_dense(model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Dequantize every 4-bit layer once and fold each LoRA update into it: a plain dense transformers model
    that computes what the 4-bit base + adapter compute (up to rounding to ``dtype``), with no per-step
    dequantization. The merge is done in float32 on the dequantized weights, never into 4-bit weights
    (re-quantizing a merged weight loses the adapter, peft#2321)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    base = unwrap(model)
    for name, module in list(base.named_modules()):
        if name.endswith(".base_layer") or ".lora_" in name:
            continue  # parts of a LoRA layer: handled with it
        is_lora = hasattr(module, "base_layer") and hasattr(module, "lora_A")
        if not is_lora and not isinstance(module, bnb.nn.Linear4bit):
            continue
        inner = module.base_layer if is_lora else module
        four_bit = isinstance(inner, bnb.nn.Linear4bit)
        dense = dequantize_4bit(inner.weight.data, inner.weight.quant_state) if four_bit else inner.weight.data
        merged = dense.float()
        for key in module.active_adapters if is_lora else []:
            if key in module.lora_A:
                a, b = module.lora_A[key].weight.float(), module.lora_B[key].weight.float()
                merged = merged + module.scaling[key] * (b @ a)
        out_dtype = dtype or dense.dtype
        linear = torch.nn.Linear(inner.in_features, inner.out_features, bias=inner.bias is not None,
                                 device=merged.device, dtype=out_dtype)
        with torch.no_grad():
            linear.weight.copy_(merged)
            if inner.bias is not None:
                linear.bias.copy_(inner.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent_name) if parent_name else base, child, linear)
    base.hf_quantizer = None
    base.is_quantized = False
    if hasattr(base.config, "quantization_config"):
        del base.config.quantization_config
    return base
