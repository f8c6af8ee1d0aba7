"""titlegen's two attention functions for transformers models, registered through ``AttentionInterface``.

- ``titlegen_varlen`` (training, ``data.packing``): a packed row holds several examples, each attending only to
  itself. The boundaries come as cumulative sequence lengths (``cu_seq_lens``); on CUDA PyTorch's variable-length
  flash attention runs them in one kernel, elsewhere an exact SDPA loop per example. Ordinary padded batches
  (validation) fall through to plain SDPA with the padding mask.
- ``titlegen_decode`` (the decoding loop, :mod:`titlegen.generate.loop`): one new token per row against a
  preallocated KV cache; the query heads that share a K/V head are laid out as that head's query positions, so
  SDPA reads each cached K/V head once instead of a repeated copy.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from titlegen.model import decode_kernel
from titlegen.model.lora import unwrap

PACKED_ATTENTION = "titlegen_varlen"
DECODE_ATTENTION = "titlegen_decode"
DECODE_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# ---- packed training ---------------------------------------------------------------------------------------
def _varlen_kernel():
    if not torch.cuda.is_available():
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@torch.compiler.disable  # under model.backbone.compile_layers: the kernel runs as is, between compiled parts
def _cuda_varlen(q, k, v, cu, max_len, scaling):
    """(T, H, D) inputs; causal within each segment."""
    kernel = _varlen_kernel()
    params = inspect.signature(kernel).parameters
    kwargs: dict = {"scale": scaling}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)  # causal
    else:
        kwargs["is_causal"] = True
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return kernel(q, k, v, cu, cu, max_len, max_len, **kwargs)


def _loop_varlen(q, k, v, cu, scaling):
    """Reference: SDPA on each segment separately (exact; any device)."""
    out = torch.empty_like(q)
    groups = q.shape[1] // k.shape[1]
    bounds = cu.tolist()
    for a, b in zip(bounds, bounds[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # (H, n, D)
        if groups > 1:
            ks, vs = ks.repeat_interleave(groups, dim=0), vs.repeat_interleave(groups, dim=0)
        out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling).transpose(0, 1)
    return out


def varlen_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention interface: (B, H, T, D) in, (B, T, H, D) out."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1:
        raise ValueError("packed batches hold one row")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D)
    if q.is_cuda and _varlen_kernel() is not None:
        out = _cuda_varlen(q, k, v, cu, int(kwargs.get("max_length_q")), scaling)
    else:
        out = _loop_varlen(q, k, v, cu, scaling)
    return out.unsqueeze(0), None


def packed_forward_kwargs(batch: dict) -> dict:
    """Keyword arguments for the model trunk: positions, boundaries, and an all-ones mask (so transformers does
    not build a dense block-diagonal mask from the position ids; the boundaries go to the attention instead)."""
    cu, max_len = batch["cu_seq_lens"], int(batch["max_length"])
    return {
        "position_ids": batch["position_ids"],
        "attention_mask": torch.ones_like(batch["input_ids"]),
        "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_len, "max_length_k": max_len,
    }


# ---- decoding ----------------------------------------------------------------------------------------------
def decode_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention interface: (B, H, T, D) in, (B, T, H, D) out. ``attention_mask`` is a boolean
    (B, 1, T, S) mask (True: attend), prepared by :func:`titlegen.generate.loop.generate_fast`."""
    b, heads, t, d = query.shape
    kv_heads = key.shape[1]
    if t == 1 and heads != kv_heads:
        # One new token: the G query heads of a K/V group become G "positions" of that group, so SDPA reads each
        # cached K/V head once instead of a G-times repeated copy.
        q = query.reshape(b, kv_heads, heads // kv_heads, d)
        out = decode_kernel.decode_attention(q, key, value, attention_mask, scaling or d ** -0.5)
        if out is not None:
            return out.reshape(b, heads, 1, d).transpose(1, 2), None
        # Memory-efficient attention takes the mask as is; cuDNN's (PyTorch's first pick on Hopper) would plan
        # anew for every cache length, milliseconds of host time per layer per step.
        with sdpa_kernel(DECODE_BACKENDS):
            out = F.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, scale=scaling)
        return out.reshape(b, heads, 1, d).transpose(1, 2), None
    if heads != kv_heads:
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling)
    return out.transpose(1, 2), None


def register_attentions() -> None:
    """Make both names valid ``attn_implementation`` values (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for name, forward in ((PACKED_ATTENTION, varlen_attention_forward), (DECODE_ATTENTION, decode_attention_forward)):
        AttentionInterface.register(name, forward)
        AttentionMaskInterface.register(name, sdpa_mask)


def supports_fast_decoding(model: torch.nn.Module) -> bool:
    """Whether the model's attention can be switched (transformers' ``AttentionInterface`` models)."""
    hf = unwrap(model)
    return hasattr(hf, "set_attn_implementation") and hf._can_set_attn_implementation()


@contextlib.contextmanager
def decode_attention(model: torch.nn.Module):
    """Switch the model to the decoding attention for the duration of the block."""
    register_attentions()
    hf = unwrap(model)
    previous = hf.config._attn_implementation
    hf.set_attn_implementation(DECODE_ATTENTION)
    try:
        yield
    finally:
        hf.set_attn_implementation(previous)
