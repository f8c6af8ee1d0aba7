"""Triton kernels for the decoding loop's elementwise work on a GPU: RMSNorm, the rotary position embedding and
the SwiGLU's ``silu(gate) * up``, each one pass over its tensors.

Why: after the matmuls, the largest share of a predict step is the model's elementwise code, run op by op. H200,
merged Llama-3-8B, 2,048 rows (``scripts/bench/profile_predict.py --merged``): of a 4.3 s prefill, 2.8 s are
matmuls and about 1.4 s elementwise kernels (mul, copy, add, cat); transformers' RMSNorm alone makes six passes
over the hidden states, four of them in float32, and the rotary embedding five. Each kernel here reads its inputs
once and writes its output once, rounding where transformers' code rounds (each bf16/fp16 intermediate). On the
H200 the norm and the SwiGLU are within two rounding steps of transformers' and 99.9% equal; the compiled rotary
embedding is 82-87% equal (its two products seem not to be rounded before their sum) and no further from the
exact rotation (tests/gpu/test_infer_kernels.py).

Switched on only inside the decoding loop (:func:`switched_on`), on a GPU, without gradients, and only for the
model classes whose code they reproduce (``NORMS``, ``ATTENTIONS``, and ``MLPS`` with a SiLU activation).
Everywhere else, and after a kernel fails once (one warning), the model's own code runs.
"""

from __future__ import annotations

import contextlib
import logging
import sys

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install
    triton = None

log = logging.getLogger("titlegen")

NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}  # weight * (x / rms(x)).to(dtype)
ATTENTIONS = {"LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention"}  # rotate_half RoPE
MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}  # down(act(gate(x)) * up(x))
MAX_ELEMENTS = 2**31 - 1  # the kernels index with 32-bit integers
enabled = True  # off after a failed launch, and in tests comparing with the model's own code
active = 0  # > 0 inside switched_on: the fused 4-bit MLP's inference path (fused.py) asks

if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, sx, sy, n, inv_n, eps, BLOCK: tl.constexpr):
        row, cols = tl.program_id(0), tl.arange(0, BLOCK)
        inside = cols < n
        x = tl.load(x_ptr + row * sx + cols, mask=inside, other=0.0).to(tl.float32)
        variance = tl.sum(x * x, 0) * inv_n  # ATen's mean: the sum times 1/n
        normed = (x * tl.math.rsqrt(variance + eps)).to(y_ptr.dtype.element_ty)  # rounded before the weight
        w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * sy + cols, (w * normed.to(tl.float32)).to(y_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _rope_kernel(x_ptr, c_ptr, s_ptr, o_ptr, T, H, sxb, sxh, sxt, sob, soh, sot, scb, sct, ssb, sst,
                     HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        b = tl.program_id(0) // T
        t = tl.program_id(0) % T
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        d = tl.arange(0, HALF)
        heads = (h < H)[:, None]
        xs = x_ptr + b * sxb + t * sxt + h[:, None] * sxh + d[None, :]
        x1 = tl.load(xs, mask=heads, other=0.0).to(tl.float32)
        x2 = tl.load(xs + HALF, mask=heads, other=0.0).to(tl.float32)
        cs = c_ptr + b * scb + t * sct + d
        ss = s_ptr + b * ssb + t * sst + d
        c1 = tl.load(cs)[None, :].to(tl.float32)
        c2 = tl.load(cs + HALF)[None, :].to(tl.float32)
        s1 = tl.load(ss)[None, :].to(tl.float32)
        s2 = tl.load(ss + HALF)[None, :].to(tl.float32)
        dt = o_ptr.dtype.element_ty
        # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1): each product rounded, then the sum
        o1 = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
        o2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
        os = o_ptr + b * sob + t * sot + h[:, None] * soh + d[None, :]
        tl.store(os, o1.to(dt), mask=heads)
        tl.store(os + HALF, o2.to(dt), mask=heads)

    @triton.jit
    def _silu_mul_kernel(e_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        e = tl.load(e_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        silu = tl.math.div_rn(e, 1.0 + tl.exp(-e)).to(h_ptr.dtype.element_ty)  # F.silu rounds before the product
        tl.store(h_ptr + offs, (silu.to(tl.float32) * u).to(h_ptr.dtype.element_ty), mask=inside)


def _usable(*tensors: torch.Tensor) -> bool:
    x = tensors[0]
    return (enabled and triton is not None and x.is_cuda and x.numel() > 0 and not torch.is_grad_enabled()
            and x.dtype in (torch.bfloat16, torch.float16) and all(t.dtype == x.dtype for t in tensors)
            and x.numel() <= MAX_ELEMENTS and all(t.stride(-1) == 1 for t in tensors))


def _launch(name: str, launch) -> bool:
    global enabled
    try:
        launch()
        return True
    except Exception as err:  # Triton's compile errors have no common base class; the model's code gives the same
        enabled = False
        log.warning("the Triton %s kernel failed (%s); using the model's own code",
                    name, str(err).splitlines()[0][:200] if str(err) else type(err).__name__)
        return False


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """transformers' RMSNorm of ``x`` over its last dimension, or None where the kernel does not apply."""
    if not _usable(x, weight) or x.shape[-1] > 16384:
        return None
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.empty_like(x2)
    n = x2.shape[1]
    block = triton.next_power_of_2(n)
    warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    ok = _launch("RMSNorm", lambda: _rms_norm_kernel[(x2.shape[0],)](
        x2, weight, y, x2.stride(0), y.stride(0), n, 1.0 / n, eps, BLOCK=block, num_warps=warps))
    return y.view(x.shape) if ok else None


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """``x * cos + rotate_half(x) * sin`` for ``x`` (B, heads, T, D) and ``cos``/``sin`` (B, T, D)."""
    half = x.shape[-1] // 2
    if cos.dim() == 3 and cos.shape[0] == sin.shape[0] == 1 and x.dim() == 4:  # positions shared by the rows
        cos, sin = cos.expand(x.shape[0], -1, -1), sin.expand(x.shape[0], -1, -1)
    if (x.dim() != 4 or cos.dim() != 3 or not _usable(x, cos, sin) or half < 8 or half & (half - 1)
            or cos.shape != (x.shape[0], x.shape[2], x.shape[3]) or sin.shape != cos.shape):
        return None
    b, heads, t, _ = x.shape
    out = torch.empty_like(x)
    block_h = min(16, triton.next_power_of_2(heads))
    grid = (b * t, triton.cdiv(heads, block_h))
    ok = _launch("rotary-embedding", lambda: _rope_kernel[grid](
        x, cos, sin, out, t, heads, x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1),
        out.stride(2), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1), HALF=half, BLOCK_H=block_h))
    return out if ok else None


def silu_mul(e: torch.Tensor, u: torch.Tensor) -> torch.Tensor | None:
    """``F.silu(e) * u`` for two contiguous tensors of one shape, or None where the kernel does not apply."""
    if e.shape != u.shape or not (e.is_contiguous() and u.is_contiguous()) or not _usable(e, u):
        return None
    h = torch.empty_like(e)
    block = 2048
    ok = _launch("SwiGLU", lambda: _silu_mul_kernel[(triton.cdiv(e.numel(), block),)](e, u, h, e.numel(),
                                                                                        BLOCK=block))
    return h if ok else None


@contextlib.contextmanager
def switched_on(model: torch.nn.Module):
    """For the block: the kernels in place of the model's RMSNorms, rotary embeddings and SwiGLU MLPs (where they
    reproduce its code and it is on a GPU). Modules whose forward was already replaced (fused.py) keep theirs."""
    global active
    undo = []
    if applies_to(model):
        for module in model.modules():
            kind = type(module).__name__
            if kind in ATTENTIONS:
                _swap_rotary(sys.modules[type(module).__module__], undo)
            elif "forward" not in vars(module) and (kind in NORMS or (kind in MLPS and is_silu(module))):
                module.forward = (_norm_forward if kind in NORMS else _mlp_forward)(module)
                undo.append(lambda m=module: vars(m).pop("forward", None))
    active += 1
    try:
        yield
    finally:
        active -= 1
        for step in reversed(undo):
            step()


def applies_to(model: torch.nn.Module) -> bool:
    """Triton is there, no kernel has failed, and the model is on a GPU."""
    return triton is not None and enabled and any(p.is_cuda for p in model.parameters())


def is_silu(mlp: torch.nn.Module) -> bool:
    """Whether an MLP's activation is SiLU (transformers' ``SiLUActivation`` or torch's)."""
    act = getattr(mlp, "act_fn", None)
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _norm_forward(norm: torch.nn.Module):
    original = type(norm).forward.__get__(norm)

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = rms_norm(x, norm.weight, norm.variance_epsilon)
        return y if y is not None else original(x)
    return forward


def _mlp_forward(mlp: torch.nn.Module):
    def forward(x: torch.Tensor) -> torch.Tensor:
        e, u = mlp.gate_proj(x), mlp.up_proj(x)
        h = silu_mul(e, u)
        return mlp.down_proj(h if h is not None else F.silu(e) * u)
    return forward


def _swap_rotary(module, undo: list) -> None:
    """The model file's ``apply_rotary_pos_emb`` (a module global its attention calls) swapped for the block."""
    original = getattr(module, "apply_rotary_pos_emb", None)
    if original is None or getattr(original, "titlegen_kernel", False):
        return

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if not args and not kwargs:
            q2, k2 = rotary(q, cos, sin), rotary(k, cos, sin)
            if q2 is not None and k2 is not None:
                return q2, k2
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.titlegen_kernel = True
    module.apply_rotary_pos_emb = apply_rotary_pos_emb
    undo.append(lambda: setattr(module, "apply_rotary_pos_emb", original))
