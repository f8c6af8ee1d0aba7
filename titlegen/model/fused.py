"""Fused QLoRA training paths (``model.backbone.fused_lora``): each adapted projection, and each SwiGLU MLP as a
whole, is one autograd function instead of PEFT's and bitsandbytes' chain of small operations.

The math is PEFT's: ``y = x W^T + s (x A^T) B^T`` with ``W`` the dequantized 4-bit weight. What changes:
- one autograd node per projection (or MLP) and no defensive copy of every output: less host time per layer;
- the LoRA update is added inside the base matmul's output by ``addmm`` (one kernel, no scaled temporary);
- the MLP keeps only its input and the gate and up outputs for the backward pass, where ``silu(gate) * up`` is
  recomputed: two fewer (tokens x intermediate) tensors per layer than SiLU and the product each saving theirs.

With ``model.backbone.fused_lora`` the training forward (gradients on, one active adapter, no dropout, not merged)
takes these paths. With ``model.backbone.fused_lora_inference`` (on by default) the forward without gradients
(validation, predict) takes them too, also for an adapter with dropout in eval mode, where dropout is the identity:
there the gain is the ``addmm`` (PEFT copies the base output, scales the LoRA output into a temporary, then adds
it: three more passes over every projection's output). Anything else (the adapter off, several adapters, a merged
one, a bias) runs PEFT's own forward unchanged.
"""

from __future__ import annotations

import contextlib
import types

import torch

from titlegen.model.elementwise import elementwise, silu_mul, silu_mul_backward_
from titlegen.model.infer_kernels import is_silu


def _dense(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight (out, in) in ``dtype``: dequantized on the fly when it is 4-bit."""
    weight = base.weight
    # a weight gathered by FSDP2 is a plain tensor: its 4-bit state stays on the module (bitsandbytes keeps it there)
    state = getattr(weight, "quant_state", None) or getattr(base, "quant_state", None)
    if state is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, state).to(dtype)
    return weight.to(dtype)


# Decoder layers whose MLP output enters only the residual sum that ends the layer. When such a layer is recomputed
# for its backward pass, the layer's output is discarded (only the tensors saved on the way are wanted), so its MLP
# can skip the down projection's base matmul: a fifth of the layer's matmul work (Llama-3-8B). Layers that read the
# MLP output again (a norm after the MLP: OLMo 2, Gemma; dropout on it: Phi-3) are not listed.
RESIDUAL_ONLY_MLP = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")
_recomputing = 0  # > 0 while a decoder layer is recomputed for its backward pass


@contextlib.contextmanager
def recomputing():
    """Around a decoder layer's recomputation (checkpointing, offload): its output is never read."""
    global _recomputing
    _recomputing += 1
    try:
        yield
    finally:
        _recomputing -= 1


def recompute_contexts() -> tuple:
    """``context_fn`` of ``torch.utils.checkpoint``: nothing around the forward, :func:`recomputing` around the
    recomputation."""
    return contextlib.nullcontext(), recomputing()


def _project(x2: torch.Tensor, base, a: torch.Tensor, b: torch.Tensor, scale: float) -> tuple:
    """(x W^T + s (x A^T) B^T, x A^T) for 2-D ``x2``."""
    xa = x2 @ a.t()
    # in place: ``torch.addmm(c, ...)`` would first copy ``c`` into a new tensor (one more pass and temporary)
    return (x2 @ _dense(base, x2.dtype).t()).addmm_(xa, b.t(), alpha=scale), xa


def _project_grad(dy: torch.Tensor, x2: torch.Tensor, xa: torch.Tensor, base, a, b, scale: float,
                  grad_dtype: torch.dtype) -> tuple:
    """(dx, dA, dB) of :func:`_project` for the output gradient ``dy`` (2-D); dA and dB in ``grad_dtype`` (the
    adapter's), the scaling and the cast in one kernel each."""
    dyb = dy @ b
    dx = (dy @ _dense(base, dy.dtype)).addmm_(dyb, a, alpha=scale)
    da = torch.mul(dyb.t() @ x2, scale, out=a.new_empty(a.shape, dtype=grad_dtype))
    db = torch.mul(dy.t() @ xa, scale, out=b.new_empty(b.shape, dtype=grad_dtype))
    return dx, da, db


def _adapter(layer) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(A, B, scaling) when ``layer`` is a PEFT LoRA layer that the fused path can run now, else None."""
    if not hasattr(layer, "lora_A") or layer.disable_adapters or layer.merged:
        return None
    active = layer.active_adapters
    if len(active) != 1 or active[0] not in layer.lora_A or active[0] in getattr(layer, "lora_variant", {}):
        return None
    name = active[0]
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity) and (layer.training or torch.is_grad_enabled()):
        return None  # dropout draws masks in training; in eval mode without gradients it is the identity
    if getattr(layer.base_layer, "bias", None) is not None:
        return None
    return layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul with ``x`` runs in: autocast's when it is on, else ``x``'s own."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, b, base, scale):
        x2 = x.reshape(-1, x.shape[-1])
        a_x, b_x = a.to(x.dtype), b.to(x.dtype)
        y, xa = _project(x2, base, a_x, b_x, scale)
        ctx.save_for_backward(x2, xa, a_x, b_x)  # the casts too: the backward needs them again
        ctx.base, ctx.scale, ctx.shape, ctx.grad_dtype = base, scale, x.shape, a.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, xa, a, b = ctx.saved_tensors
        dy = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)
        dx, da, db = _project_grad(dy, x2, xa, ctx.base, a, b, ctx.scale, ctx.grad_dtype)
        return dx.view(ctx.shape), da, db, None, None  # A and B share a dtype (PEFT, cast_adapter)


CHUNK_ROWS = 2048  # the MLP's (tokens x intermediate) temporaries are made this many tokens at a time


def _chunks(n: int):
    return [slice(i, min(i + CHUNK_ROWS, n)) for i in range(0, n, CHUNK_ROWS)]


class _SwiGLU(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)), each projection with its adapter; saves x, gate(x) and up(x) only, and makes
    the (tokens x intermediate) temporaries of the product and its gradients a chunk of tokens at a time."""

    @staticmethod
    def forward(ctx, x, ag, bg, au, bu, ad, bd, bases, scales, unread: bool, training: bool):
        """``unread``: the output is never read (a recomputation), so it is left unwritten. ``training``: the
        module is in training mode (its elementwise part compiled on a GPU)."""
        x2 = x.reshape(-1, x.shape[-1])
        lo = [t.to(x.dtype) for t in (ag, bg, au, bu, ad, bd)]
        e, xag = _project(x2, bases[0], lo[0], lo[1], scales[0])
        u, xau = _project(x2, bases[1], lo[2], lo[3], scales[1])
        w_down = None if unread else _dense(bases[2], x.dtype)
        y = x2.new_empty(x2.shape[0], lo[5].shape[0])
        had = x2.new_empty(x2.shape[0], lo[4].shape[0])
        for rows in _chunks(x2.shape[0]):
            h = elementwise(silu_mul, e[rows], u[rows], training=training)
            torch.mm(h, lo[4].t(), out=had[rows])
            if w_down is not None:
                torch.mm(h, w_down.t(), out=y[rows]).addmm_(had[rows], lo[5].t(), alpha=scales[2])
        ctx.save_for_backward(x2, e, u, xag, xau, had, *lo)  # the adapter casts too: the backward needs them again
        ctx.bases, ctx.scales, ctx.shape, ctx.grad_dtype = bases, scales, x.shape, ag.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, e, u, xag, xau, had, *lo = ctx.saved_tensors
        dy = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)
        (ag, bg, au, bu, ad, bd), (sg, su, sd), (gate, up, down) = lo, ctx.scales, ctx.bases
        da_d, db_d = _down_grad_rows(dy, e, u, had, down, ad, bd, sd)
        de, du = e, u  # overwritten with the gradients of gate(x) and up(x) now
        deb, dub = de @ bg, du @ bu
        # gate's and up's weights dequantized one after the other, each used once for all tokens
        dx = (de @ _dense(gate, de.dtype)).addmm_(du, _dense(up, du.dtype))
        dx.addmm_(deb, ag, alpha=sg).addmm_(dub, au, alpha=su)
        grads = [(deb.t() @ x2, sg), (de.t() @ xag, sg), (dub.t() @ x2, su), (du.t() @ xau, su)]
        grads = [torch.mul(g, s, out=g.new_empty(g.shape, dtype=ctx.grad_dtype)) for g, s in grads]
        return dx.view(ctx.shape), *grads, da_d.to(ctx.grad_dtype), db_d.to(ctx.grad_dtype), None, None, None, None


def _down_grad_rows(dy, e, u, had, down, ad, bd, sd) -> tuple[torch.Tensor, torch.Tensor]:
    """The down projection's adapter gradients (fp32), made a chunk of tokens at a time with its base weight
    dequantized once. Each chunk's gradients of ``silu(e) * u`` are written over ``e`` and ``u``, which the
    backward reads no more: no new (tokens x intermediate) tensors for them, and the gate and up projections'
    gradients then run once over every token (three dequantizations per layer, not three per chunk)."""
    w_down, dyb = _dense(down, dy.dtype), dy @ bd
    da = torch.zeros_like(ad, dtype=torch.float32)
    for rows in _chunks(dy.shape[0]):
        dh = (dy[rows] @ w_down).addmm_(dyb[rows], ad, alpha=sd)
        h = elementwise(silu_mul_backward_, e[rows], u[rows], dh, training=True)  # silu(e) * u: down's input
        da.add_(dyb[rows].t() @ h, alpha=sd)
    return da, torch.mul(dy.t() @ had, sd, out=bd.new_empty(bd.shape, dtype=torch.float32))


def lora_linear(layer, x: torch.Tensor) -> torch.Tensor | None:
    """The fused projection, or None where PEFT's forward must run."""
    adapter = _adapter(layer)
    if adapter is None:
        return None
    a, b, scale = adapter
    dtype = compute_dtype(x)  # before autocast is switched off below, which would make it x's own dtype
    with torch.autocast(x.device.type, enabled=False):
        return _Linear.apply(x.to(dtype), a, b, layer.base_layer, scale)


@torch.compiler.disable  # dynamo cannot trace the chunked backward; under compile_layers this part runs as is
def swiglu_mlp(mlp, x: torch.Tensor) -> torch.Tensor | None:
    """The fused MLP, or None where the model's own forward must run."""
    adapters = [_adapter(getattr(mlp, name)) for name in ("gate_proj", "up_proj", "down_proj")]
    if any(a is None for a in adapters):
        return None
    (ag, bg, sg), (au, bu, su), (ad, bd, sd) = adapters
    bases = (mlp.gate_proj.base_layer, mlp.up_proj.base_layer, mlp.down_proj.base_layer)
    dtype = compute_dtype(x)
    unread = _recomputing > 0 and getattr(mlp, "residual_only", False)
    with torch.autocast(x.device.type, enabled=False):
        return _SwiGLU.apply(x.to(dtype), ag, bg, au, bu, ad, bd, bases, (sg, su, sd), unread, mlp.training)


def _fused_forward(fused, original, training: bool, inference: bool):
    def forward(self, x, *args, **kwargs):
        wanted = training if torch.is_grad_enabled() else inference
        out = fused(self, x) if wanted and not args and not kwargs else None
        return out if out is not None else original(x, *args, **kwargs)
    return forward


def install(model: torch.nn.Module, training: bool = True, inference: bool = False) -> int:
    """Route the forward of every SwiGLU MLP and every other LoRA projection through the fused paths: with
    gradients (``training``) and/or without (``inference``). Returns the number of modules changed."""
    changed, inside_mlp = 0, set()
    for module in model.modules():
        names = ("gate_proj", "up_proj", "down_proj")
        if all(hasattr(getattr(module, n, None), "lora_A") for n in names) and is_silu(module):
            module.forward = types.MethodType(_fused_forward(swiglu_mlp, module.forward, training, inference), module)
            module.fused_training = training
            inside_mlp.update(id(getattr(module, n)) for n in names)
            changed += 1
    for module in model.modules():
        if type(module).__name__ in RESIDUAL_ONLY_MLP and hasattr(getattr(module, "mlp", None), "gate_proj"):
            module.mlp.residual_only = True
    for module in model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer") and id(module) not in inside_mlp:
            module.forward = types.MethodType(_fused_forward(lora_linear, module.forward, training, inference),
                                              module)
            changed += 1
    return changed


def with_dropout(model: torch.nn.Module) -> int:
    """How many LoRA layers have dropout, which keeps them on PEFT's path."""
    return sum(1 for m in model.modules() if hasattr(m, "lora_dropout")
               and any(not isinstance(d, torch.nn.Identity) for d in m.lora_dropout.values()))
