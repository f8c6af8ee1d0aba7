"""The SwiGLU MLP's elementwise parts, ``silu(e) * u`` and its gradients, for the fused MLP (fused.py). On a GPU
each is one compiled kernel (the backward's writes its results over its inputs): one pass over the (tokens x
intermediate) tensors instead of up to ten eager ones, bandwidth-bound work of about 1 ms per Llama-3-8B layer at
8,192 tokens. Eager on a CPU, where compiling is slow. In the decoding loop ``silu_mul`` is a Triton kernel
(:mod:`titlegen.model.infer_kernels`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from titlegen.model import infer_kernels


def silu_mul(e: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(e) * u


def silu_mul_backward_(e: torch.Tensor, u: torch.Tensor, dh: torch.Tensor) -> torch.Tensor:
    """Returns silu(e) * u, and writes its gradients for the output gradient ``dh`` over the inputs: d/de into
    ``e``, d/du into ``u`` (the MLP's backward reads them no more). silu'(e) = sig (1 + e (1 - sig))."""
    sig = torch.sigmoid(e)
    silu = e * sig
    de = sig * (1 + e * (1 - sig)) * u * dh
    h = silu * u
    u.copy_(silu * dh)
    e.copy_(de)
    return h


FUSE_ELEMENTWISE = True
_compiled: dict = {}


def elementwise(fn, *tensors: torch.Tensor, training: bool):
    """``fn(*tensors)``, compiled into one kernel when the tensors are on a GPU and ``training`` (a training
    step's forward, also one without gradients such as the offload's, or its backward, where gradients are off)."""
    if not training and fn is silu_mul and infer_kernels.active:  # inside the decoding loop: a Triton kernel
        out = infer_kernels.silu_mul(*tensors)
        if out is not None:
            return out
    # Training only: predict's decoding is recorded as CUDA graphs, and a capture must not compile.
    fast = FUSE_ELEMENTWISE and tensors[0].is_cuda and training
    if not fast or (fn not in _compiled and torch.cuda.is_current_stream_capturing()):
        return fn(*tensors)
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _compiled[fn](*tensors)
