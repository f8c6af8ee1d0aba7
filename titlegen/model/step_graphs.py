"""``model.backbone.training_graphs``: the packed training step's decoder trunk (embeddings, every layer, final
norm) recorded as CUDA graphs, one forward and one backward graph per padded row length, and replayed.

Why: the notebook recipe's step is small (8 examples, ~1,900 tokens): an 8B NF4 step launches ~11,000 kernels
through bitsandbytes, PEFT and transformers Python, and the host takes three times longer to issue them than the
GPU to run them (H200: GPU busy 0.18 s of a 0.58 s step). A replay issues a whole pass with one launch.

What a replay needs, and how it gets it:
- fixed shapes: each packed row is padded at its end to a multiple of ``BUCKET_TOKENS`` tokens with dummy
  segments (they attend to themselves only, their labels are ignored), so a few lengths cover every step;
- fixed addresses: the inputs are copied into the recorded buffers; the LoRA weights are updated in place by the
  optimizer; the adapter gradients leave the recorded buffers as fresh copies that autograd puts in ``.grad``;
- nothing read back to the host inside: attention's longest segment is given as the padded length (an upper
  bound: the same result), and recomputation does not save RNG state (so no dropout anywhere).
With ``offload_activations`` the recorded forward copies each recomputed layer's input to a fixed pinned
buffer on a side stream and the recorded backward copies it back ahead of its layer (:mod:`offload`); with
``compile_layers`` the compiled kernels of the eager first step are recorded. The loss (response tokens only) and
the optimizer stay eager. Memory: every graph shares one pool, sized by its
first recording: the epoch's longest row, known from the batch plan at the epoch's start. A longer row than the
pool's (a new epoch's, or when no plan is known) drops every graph and starts a new pool, so the pool never holds
two sizes' worth. The first training step runs eagerly (the lazy set-up of every library happens there, not in a
capture).
"""

from __future__ import annotations

import contextlib
import logging
import time
from functools import partial

import torch
import torch.nn.functional as F

from titlegen.data.encoding import IGNORE_INDEX
from titlegen.errors import TitlegenError

log = logging.getLogger("titlegen")

BUCKET_TOKENS = 256  # padded row lengths are multiples of this: ~130 padding tokens per step on average
SEGMENT_SLOTS = 4  # segment boundaries are padded to a multiple of this many entries
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")  # decoders whose trunk is trunk_forward (CPU tests)
NO_DROPOUT = "model.backbone.training_graphs: needs model.lora.dropout 0 (a replayed step cannot redraw dropout masks)"


def capture_autocast(device: torch.device):
    """The caller's autocast without its weight-cast cache: casts cached during a capture would live in the
    graph's memory and be freed when autocast exits, under a graph that still reads them."""
    if not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.get_autocast_dtype(device.type), cache_enabled=False)


def check_model(decoder: torch.nn.Module) -> None:
    """Stop with one line when the decoder is not one whose trunk :func:`trunk_forward` reproduces, or when it
    draws random numbers (dropout: a replay would redraw nothing, and recomputation keeps no RNG state)."""
    config = decoder.config
    if config.model_type not in ARCHITECTURES:
        raise TitlegenError(f"model.backbone.training_graphs: supports {', '.join(ARCHITECTURES)} decoders, not "
                            f"{config.model_type!r} (set it false)")
    if getattr(config, "attention_dropout", 0.0):
        raise TitlegenError("model.backbone.training_graphs: the model's attention_dropout is above 0 (set it false)")


def bucket(tokens: int) -> int:
    """The padded length of a row of ``tokens``: the next multiple of ``BUCKET_TOKENS`` with ``SEGMENT_SLOTS``
    tokens to spare, so that every padding segment has at least one."""
    return -(-(tokens + SEGMENT_SLOTS) // BUCKET_TOKENS) * BUCKET_TOKENS


def pad_row(batch: dict, length: int, pad_id: int) -> tuple[torch.Tensor, ...]:
    """(input_ids, position_ids, cu_seq_lens, labels) of a packed row padded to ``length``. The padding is cut
    into 1 to ``SEGMENT_SLOTS`` segments (one token each, the last one the rest), so the boundaries fill a multiple
    of ``SEGMENT_SLOTS`` entries: rows with or without the collate's own padding segment share one graph. Device
    operations only: no value is read back to the host."""
    ids, cu = batch["input_ids"], batch["cu_seq_lens"]
    extra = length - ids.shape[1]
    pieces = SEGMENT_SLOTS - cu.numel() % SEGMENT_SLOTS
    ends = torch.arange(1, pieces + 1, device=cu.device, dtype=cu.dtype)
    ends[-1] = extra
    positions = torch.cat([batch["position_ids"], torch.arange(extra, device=ids.device)[None]], dim=1)
    return (F.pad(ids, (0, extra), value=pad_id), positions, torch.cat([cu, cu[-1:] + ends]),
            F.pad(batch["labels"], (0, extra), value=IGNORE_INDEX))


def trunk_forward(decoder: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                  cu_seq_lens: torch.Tensor, max_length: int) -> torch.Tensor:
    """The decoder's forward for one packed row (the model's own modules, in its own order), without the mask
    preparation of its ``forward``, which reads values back to the host. Returns the final hidden states."""
    hidden = decoder.embed_tokens(input_ids)
    rope = decoder.rotary_emb(hidden, position_ids)
    varlen = {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens, "max_length_q": max_length,
              "max_length_k": max_length}
    for layer in decoder.layers[: decoder.config.num_hidden_layers]:
        hidden = layer(hidden, attention_mask=None, position_ids=position_ids, position_embeddings=rope,
                       use_cache=False, **varlen)
    return decoder.norm(hidden)


@contextlib.contextmanager
def _quiet_stream_notice():
    """Silence autograd's notice that the adapter weights' gradient nodes were made on the default stream (by
    the eager first step) while the backward is recorded on the capture stream: the recorded backward returns the
    gradients (``autograd.grad``) and never runs those nodes."""
    switch = getattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch", None)
    if switch is not None:
        switch(False)
    try:
        yield
    finally:
        if switch is not None:
            switch(True)


class _GraphPair:
    """The forward and the backward (adapter gradients for a given output gradient) of ``run`` recorded for
    one set of input shapes. Recording runs nothing: the first replay computes."""

    def __init__(self, run, inputs: tuple[torch.Tensor, ...], params: tuple[torch.Tensor, ...], pool,
                 store=None) -> None:
        self.inputs = tuple(t.clone() for t in inputs)
        self.forward, self.backward = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        capture = partial(torch.cuda.graph, pool=pool, capture_error_mode="thread_local")
        with capture_autocast(inputs[0].device):
            with capture(self.forward):
                self.output = run(*self.inputs)
                if store is not None:
                    store.settle(self.output.device)  # the offload copies joined back before the capture ends
            self.grad_output = torch.zeros_like(self.output)
            with _quiet_stream_notice(), capture(self.backward):
                self.grads = torch.autograd.grad(self.output, params, self.grad_output)


class _Replay(torch.autograd.Function):
    """Replays a :class:`_GraphPair` inside autograd: forward graph now, backward graph in the backward pass."""

    @staticmethod
    def forward(ctx, pair: _GraphPair, *tensors: torch.Tensor) -> torch.Tensor:
        for static, new in zip(pair.inputs, tensors):
            static.copy_(new)
        pair.forward.replay()
        ctx.pair = pair
        return pair.output.detach()  # overwritten by the next replay: used within this step only

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        pair = ctx.pair
        pair.grad_output.copy_(grad)
        pair.backward.replay()
        # Copies (one multi-tensor launch): autograd may keep a returned tensor as ``.grad`` itself, which the
        # next replay would overwrite, e.g. before the next micro-batch of an accumulated step adds to it.
        return (None, *(None for _ in pair.inputs), *torch._foreach_mul(pair.grads, 1.0))


class TrunkGraphs:
    """The training trunk of a packed row as CUDA graphs: ``hidden, labels = graphs(batch)``."""

    def __init__(self, decoder: torch.nn.Module, pad_id: int) -> None:
        check_model(decoder)
        self.decoder, self.pad_id = decoder, pad_id
        self.store = getattr(decoder, "activation_store", None)  # model.backbone.offload_activations
        self.params = tuple(p for p in decoder.parameters() if p.requires_grad)
        self.pairs: dict[tuple[int, int], _GraphPair] = {}
        self.longest, self.planned, self.pool = 0, 0, None
        self.warm, self.enabled = False, True
        self.recorded, self.record_s = 0, 0.0  # graph pairs recorded so far, and the seconds that took

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        length = bucket(batch["input_ids"].shape[1])
        *inputs, labels = pad_row(batch, length, self.pad_id)
        run = partial(trunk_forward, self.decoder, max_length=length)
        if not self.warm or not self.enabled:
            self.warm = True
            with capture_autocast(inputs[0].device):  # as in a capture: compiled parts see the same autocast
                return run(*inputs), labels
        key = (length, inputs[2].numel())
        pair = self.pairs.get(key) if self.planned <= self.longest else None  # a longer plan: a new pool first
        pair = pair or self._record(key, run, tuple(inputs))
        if pair is None:
            return run(*inputs), labels
        return _Replay.apply(pair, *inputs, *self.params), labels

    def reserve(self, tokens: int | None) -> None:
        """Size the pool for rows of up to ``tokens`` (the epoch's longest, from the batch plan): its graph is
        recorded first, so no shorter row recorded before it needs a pool of its own."""
        self.planned = bucket(tokens) if tokens else 0

    def _record(self, key: tuple[int, int], run, inputs: tuple[torch.Tensor, ...]) -> _GraphPair | None:
        length = max(key[0], self.planned)
        if length > self.longest:  # a fresh pool, sized by its first recording: no two sizes' memory is held
            self.pairs.clear()
            self.pool, self.longest = torch.cuda.graph_pool_handle(), length
            if self.store is not None:  # offloaded layer inputs: fixed pinned buffers for rows of this length
                self.store.reserve(length, self.decoder.config.hidden_size, self.decoder.embed_tokens.weight.dtype)
            if length > key[0] and self._add(*_placeholder(self.decoder, length)) is None:
                return None
        return self._add(key, run, inputs)

    def _add(self, key: tuple[int, int], run, inputs: tuple[torch.Tensor, ...]) -> _GraphPair | None:
        start = time.perf_counter()
        if self.store is not None:
            self.store.settle(self.params[0].device)  # joined before the capture: it may join only its own copies
        try:
            pair = _GraphPair(run, inputs, self.params, self.pool, self.store)
        except torch.OutOfMemoryError:
            raise  # the step's own handling decides: the one-line message, or model.oom_backoff's smaller parts
        except RuntimeError as err:
            self.enabled, self.pairs, self.pool = False, {}, None
            log.warning("model.backbone.training_graphs: the training step cannot be recorded as a CUDA graph "
                        "(%s); training without graphs", str(err).splitlines()[0][:200])
            return None
        self.pairs[key] = pair
        self.recorded += 1
        self.record_s += time.perf_counter() - start
        return pair


def _placeholder(decoder: torch.nn.Module, length: int) -> tuple:
    """(key, run, inputs) of a row of ``length`` tokens in ``SEGMENT_SLOTS`` segments: recording needs shapes,
    not values."""
    device = next(decoder.parameters()).device
    ends = torch.arange(length - SEGMENT_SLOTS + 1, length + 1, device=device, dtype=torch.int32)
    cu = torch.cat([ends.new_zeros(1), ends[1:]])
    inputs = (torch.zeros(1, length, dtype=torch.long, device=device), torch.arange(length, device=device)[None], cu)
    return (length, SEGMENT_SLOTS), partial(trunk_forward, decoder, max_length=length), inputs
