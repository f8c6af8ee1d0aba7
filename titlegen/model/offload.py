"""Activation offload for the recomputed decoder layers (``model.backbone.offload_activations``).

Under gradient checkpointing a recomputed layer keeps only its input until the backward pass, but 32 layers of
8,192 tokens x 4,096 bf16 values are still 2 GiB of GPU memory. Here each recomputed layer's input goes to pinned
CPU memory instead, copied on a side stream so that the GPU goes on computing. In the backward pass each layer's
input is copied back on the side stream while the layer after it (in backward order, the one before it) is
being differentiated, so neither copy waits in the compute stream's line. The layer then runs again with
gradients and is differentiated on the spot; its adapter weights are inputs of the recorded operation, so their
gradients leave through autograd like any other (``autograd.grad`` of a recorded step, DDP's hooks).

The same code serves the CUDA graphs of ``model.backbone.training_graphs``: :meth:`ActivationStore.reserve`
gives every layer a fixed pinned buffer (a capture may not allocate pinned memory, and a replay writes where the
recording did), the side-stream copies are joined back before the recording ends, and no random-number state is
read (graphs refuse dropout, so there is nothing to replay).
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch

from titlegen.model import fused

_streams: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]


class ActivationStore:
    """The inputs of the offloaded layers (indices ``0..count-1``, in forward order) between the two passes."""

    def __init__(self, count: int, preserve_rng: bool = True) -> None:
        self.count, self.preserve_rng = count, preserve_rng
        self.host: dict[int, torch.Tensor] = {}  # index -> the CPU copy of this step's input
        self.slots: dict[int, torch.Tensor] = {}  # index -> a fixed pinned buffer (reserve), flat
        self.ahead: dict[int, torch.Tensor] = {}  # index -> its GPU copy, already on its way (prefetch)
        self.pending: list[torch.Tensor] = []  # GPU tensors that a side-stream copy may still be reading
        self.forked = False  # side-stream work not yet joined (a capture may join only what it forked itself)

    def install(self, layers: list[torch.nn.Module]) -> None:
        for index, layer in enumerate(layers):
            layer._gradient_checkpointing_func = partial(offloaded_checkpoint, self, layer, index)

    def reserve(self, tokens: int, width: int, dtype: torch.dtype) -> None:
        """Fixed pinned buffers for inputs of up to ``tokens`` x ``width`` values (before a CUDA graph capture)."""
        if self.slots and next(iter(self.slots.values())).numel() >= tokens * width:
            return
        self.slots = {i: torch.empty(tokens * width, dtype=dtype, pin_memory=True) for i in range(self.count)}

    def save(self, index: int, hidden: torch.Tensor) -> None:
        hidden = hidden.detach()
        self.ahead.pop(index, None)  # left over from a backward pass that did not finish
        if hidden.device.type != "cuda":
            self.host[index] = hidden  # nothing to gain on a CPU; the logic is the same
            return
        self.settle(hidden.device)  # the previous layer's copy (it ran beside that layer's whole forward)
        slot = self.slots.get(index)
        if slot is not None and slot.dtype == hidden.dtype and slot.numel() >= hidden.numel():
            host = slot[: hidden.numel()].view(hidden.shape)
        else:
            host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
        with self._forked(hidden.device):
            host.copy_(hidden, non_blocking=True)
        self.pending.append(hidden)  # its memory is not handed out again before the copy has read it
        self.host[index] = host

    @contextlib.contextmanager
    def _forked(self, device: torch.device):
        """Work on the side stream, after everything queued so far on the compute stream."""
        side = _side_stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        self.forked = True
        with torch.cuda.stream(side):
            yield

    def settle(self, device: torch.device) -> None:
        """The compute stream waits for every side-stream copy made so far (a capture must end joined, and may
        not wait for work from before it began)."""
        if self.forked and device.type == "cuda":
            torch.cuda.current_stream(device).wait_stream(_side_stream(device))
        self.forked = False
        self.pending.clear()

    def load(self, index: int, device: torch.device) -> torch.Tensor:
        """The input of layer ``index`` back on ``device``; starts copying the next one the backward needs."""
        host = self.host.pop(index)
        if device.type != "cuda":
            return host
        self.settle(device)
        hidden = self.ahead.pop(index, None)
        if hidden is None:
            hidden = host.to(device, non_blocking=True)
        before = self.host.get(index - 1)
        if before is not None:
            ahead = torch.empty(before.shape, dtype=before.dtype, device=device)  # the compute stream's memory:
            with self._forked(device):  # the side stream writes it only after the compute stream's last use
                ahead.copy_(before, non_blocking=True)
            self.ahead[index - 1] = ahead
        return hidden


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replay(device: torch.device, rng: tuple | None, autocast: tuple[bool, torch.dtype, bool]):
    """The forward's autocast (and random-number) state, for the recomputation in the backward pass."""
    with contextlib.ExitStack() as stack:
        if rng is not None:
            stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
            torch.set_rng_state(rng[0])
            if rng[1] is not None:
                torch.cuda.set_rng_state(rng[1], device)
        with torch.enable_grad(), torch.autocast(device.type, dtype=autocast[1], enabled=autocast[0],
                                                 cache_enabled=autocast[2]):
            yield


class _OffloadedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, store: ActivationStore, index: int, run, count: int, hidden: torch.Tensor, *rest):
        device = hidden.device
        ctx.store, ctx.index, ctx.run, ctx.device = store, index, run, device
        ctx.params, ctx.args = rest[:count], rest[count:]
        ctx.autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type),
                        torch.is_autocast_cache_enabled())
        ctx.rng = _rng_state(device) if store.preserve_rng else None
        ctx.hidden_grad = hidden.requires_grad
        store.save(index, hidden)
        with torch.no_grad():
            return run(hidden, *ctx.args)

    @staticmethod
    def backward(ctx, *grads):
        hidden = ctx.store.load(ctx.index, ctx.device).detach().requires_grad_(ctx.hidden_grad)
        with _replay(ctx.device, ctx.rng, ctx.autocast), fused.recomputing():
            out = ctx.run(hidden, *ctx.args)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
        wrt = ((hidden,) if ctx.hidden_grad else ()) + tuple(ctx.params)
        got = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
        hidden_grad, params_grad = (got[0], got[1:]) if ctx.hidden_grad else (None, got)
        return (None, None, None, None, hidden_grad, *params_grad) + (None,) * len(ctx.args)


def offloaded_checkpoint(store: ActivationStore, layer: torch.nn.Module, index: int, run, hidden: torch.Tensor,
                         *args):
    """Drop-in for ``torch.utils.checkpoint.checkpoint(run, hidden, *args)`` for ``layer`` (the ``index``-th
    offloaded one) that keeps ``hidden`` in CPU memory. The other arguments (position embeddings, masks) are kept
    as they are and must not need gradients; the layer's trainable weights (its adapter) get theirs."""
    for arg in args:
        if torch.is_tensor(arg) and arg.requires_grad:
            raise ValueError("offloaded_checkpoint: only the first argument may need gradients")
    params = [p for p in layer.parameters() if p.requires_grad]  # now: the adapter is attached after loading
    return _OffloadedLayer.apply(store, index, run, len(params), hidden, *params, *args)
