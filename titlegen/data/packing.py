"""Padding-free packing: several examples in one row, each attending only to itself.

A packed batch is one row of concatenated examples with per-example ``position_ids`` (RoPE restarts at 0) and
cumulative sequence lengths ``cu_seq_lens`` that mark the boundaries. The attention function registered here as
``titlegen_varlen`` uses PyTorch's variable-length flash attention on CUDA and an exact per-example SDPA loop
elsewhere; for ordinary padded batches (generation, evaluation) it is plain SDPA with the padding mask.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from titlegen.data.encoding import IGNORE_INDEX

ATTENTION_NAME = "titlegen_varlen"


def collate_packed(examples: Sequence[dict], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Concatenate ``examples`` into one row. Each example's first label is ignored, so no token is ever
    predicted across a boundary. The row is padded at the end with one dummy segment when asked."""
    ids, labels, positions, bounds = [], [], [], [0]
    for e in examples:
        n = len(e["input_ids"])
        ids += e["input_ids"]
        labels += [IGNORE_INDEX] + list(e["labels"][1:])
        positions += range(n)
        bounds.append(bounds[-1] + n)
    pad = -len(ids) % pad_to_multiple_of
    if pad:  # a separate trailing segment of padding: attends to itself only, never to real tokens
        ids += [pad_id] * pad
        labels += [IGNORE_INDEX] * pad
        positions += range(pad)
        bounds.append(bounds[-1] + pad)
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    return {
        "input_ids": torch.tensor([ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([positions]),
        "cu_seq_lens": torch.tensor(bounds, dtype=torch.int32),
        "max_length": torch.tensor(max(lengths)),
        "num_tokens": torch.tensor(bounds[-1] - pad),
    }


def _varlen_kernel():
    if not torch.cuda.is_available():
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


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


def register_attention() -> str:
    """Make ``titlegen_varlen`` a valid ``attn_implementation`` for transformers models."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, varlen_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME


def packed_forward_kwargs(batch: dict) -> dict:
    """Keyword arguments for the model trunk: positions, boundaries, and an all-ones mask (so transformers does
    not build a dense block-diagonal mask from the position ids; the boundaries go to the attention instead)."""
    cu, max_len = batch["cu_seq_lens"], int(batch["max_length"])
    return {
        "position_ids": batch["position_ids"],
        "attention_mask": torch.ones_like(batch["input_ids"]),
        "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_len, "max_length_k": max_len,
    }
