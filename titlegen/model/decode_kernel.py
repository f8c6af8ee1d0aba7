"""A Triton kernel for the decoding step's attention: one new token per row against the KV cache, the G query
heads of a grouped-query K/V head read as one (G x D) block, a boolean padding mask over the cache columns.

Why: at the batch sizes predict runs (thousands of rows, a cache of ~150 columns), PyTorch's attention kernels
(memory-efficient, cuDNN, flash) read the cache at about a third of the GPU's memory bandwidth; this one streams
each row's K and V once with an online softmax (H200, 2,048 rows x 150 columns: see scripts/bench/attn_decode.py).
GPU only; :func:`decode_attention` returns None where it does not apply, and the caller uses SDPA.
"""

from __future__ import annotations

import logging

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install
    triton = None

log = logging.getLogger("titlegen")

BLOCK = 64  # cache columns per loop iteration
enabled = True  # off after a failed launch (e.g. a GPU Triton cannot compile for), and in tests comparing with SDPA


if triton is not None:

    @triton.jit
    def _kernel(q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, scale, length,
                sqb, sqh, sqg, skb, skh, skl, svb, svh, svl, smb, sml, sob, soh, sog,
                G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
        row, head = tl.program_id(0), tl.program_id(1)
        g, d, n = tl.arange(0, GP), tl.arange(0, D), tl.arange(0, BLOCK_N)
        q = tl.load(q_ptr + row * sqb + head * sqh + g[:, None] * sqg + d[None, :], mask=g[:, None] < G, other=0.0)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        for start in range(0, length, BLOCK_N):
            cols = start + n
            inside = cols < length
            keep = tl.load(m_ptr + row * smb + cols * sml, mask=inside, other=0) != 0
            k = tl.load(k_ptr + row * skb + head * skh + cols[:, None] * skl + d[None, :], mask=inside[:, None],
                        other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(keep[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no column kept yet: all terms stay 0
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + row * svb + head * svh + cols[:, None] * svl + d[None, :], mask=inside[:, None],
                        other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(o_ptr + row * sob + head * soh + g[:, None] * sog + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=g[:, None] < G)


def _applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """CUDA, bf16/fp16 (fp32's dot products would run in TF32), head size 64 or 128, at most 16 query heads per
    K/V head, a boolean (B, 1, 1, S) mask, contiguous last dimensions."""
    return (enabled and triton is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
            and k.dtype == v.dtype == q.dtype and q.shape[-1] in (64, 128) and q.shape[2] <= 16
            and mask is not None and mask.dtype == torch.bool and mask.dim() == 4 and tuple(mask.shape[1:3]) == (1, 1)
            and all(t.stride(-1) == 1 for t in (q, k, v)))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor | None:
    """``q`` (B, KVH, G, D), ``k``/``v`` (B, KVH, S, D), ``mask`` boolean (B, 1, 1, S) with True = attend.
    Returns (B, KVH, G, D), or None where the kernel does not apply (:func:`_applies`) or fails."""
    global enabled
    if not _applies(q, k, v, mask):
        return None
    b, kv_heads, groups, d = q.shape
    out = torch.empty_like(q)
    m = mask.view(torch.uint8)
    try:
        _kernel[(b, kv_heads)](q, k, v, m, out, scale, k.shape[2], *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                               m.stride(0), m.stride(3), *out.stride()[:3],
                               G=groups, GP=max(16, triton.next_power_of_2(groups)), D=d, BLOCK_N=BLOCK)
    except Exception as err:  # Triton's compile errors have no common base class; SDPA gives the same result
        enabled = False
        log.warning("the Triton decoding-attention kernel failed (%s); using PyTorch's attention",
                    str(err).splitlines()[0][:200] if str(err) else type(err).__name__)
        return None
    return out
