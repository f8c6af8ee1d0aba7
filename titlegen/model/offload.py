"""Activation offload for the recomputed decoder layers (``model.backbone.offload_activations``).

Under gradient checkpointing a recomputed layer keeps only its input until the backward pass, but 32 layers of
8,192 tokens x 4,096 bf16 values are still 2 GiB of GPU memory. Here each recomputed layer's input goes to pinned
CPU memory instead, copied on a side stream so that the GPU goes on computing, and comes back when the backward
pass reaches that layer. The layer then runs again with gradients and is differentiated on the spot (the
"reentrant" form of checkpointing), with the forward's autocast and random-number state, so dropout masks and
dtypes are those of the first run.
"""

from __future__ import annotations

import contextlib

import torch

_streams: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of a CUDA tensor, made on a side stream (the caller's stream does not wait for it)."""
    tensor = tensor.detach()
    if tensor.device.type != "cuda":
        return tensor  # nothing to gain on a CPU; the logic is the same
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    side = _side_stream(tensor.device)
    side.wait_stream(torch.cuda.current_stream(tensor.device))
    with torch.cuda.stream(side):
        host.copy_(tensor, non_blocking=True)
    tensor.record_stream(side)  # its GPU memory is not handed out again before the copy has read it
    return host


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return host
    torch.cuda.current_stream(device).wait_stream(_side_stream(device))  # the offload copy has finished
    return host.to(device, non_blocking=True)


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replay(device: torch.device, rng: tuple, autocast: tuple[bool, torch.dtype]):
    """The forward's random-number and autocast state, for the recomputation in the backward pass."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state(rng[1], device)
        with torch.enable_grad(), torch.autocast(device.type, dtype=autocast[1], enabled=autocast[0]):
            yield


class _OffloadedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, hidden, anchor, *args):
        device = hidden.device
        ctx.run, ctx.args, ctx.device = run, args, device
        ctx.autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        ctx.rng = _rng_state(device)
        ctx.host = to_host(hidden)
        ctx.hidden_grad = hidden.requires_grad
        with torch.no_grad():
            return run(hidden, *args)

    @staticmethod
    def backward(ctx, *grads):
        hidden = to_device(ctx.host, ctx.device).detach().requires_grad_(ctx.hidden_grad)
        ctx.host = None
        with _replay(ctx.device, ctx.rng, ctx.autocast):
            out = ctx.run(hidden, *ctx.args)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, hidden.grad if ctx.hidden_grad else None, None) + (None,) * len(ctx.args)


def offloaded_checkpoint(run, hidden: torch.Tensor, *args):
    """Drop-in for ``torch.utils.checkpoint.checkpoint(run, hidden, *args)`` that keeps ``hidden`` in CPU memory.

    The other arguments (position embeddings, masks) are kept as they are and must not need gradients. The
    ``anchor`` makes the output require gradients even when ``hidden`` does not (the first layer after a frozen
    embedding), so that the layer's own LoRA weights still get theirs.
    """
    for arg in args:
        if torch.is_tensor(arg) and arg.requires_grad:
            raise ValueError("offloaded_checkpoint: only the first argument may need gradients")
    anchor = torch.empty(0, requires_grad=True)
    return _OffloadedLayer.apply(run, hidden, anchor, *args)
