"""titlegen's own batched decoding loop: a preallocated KV cache, grouped-query attention without copying K/V,
and rows that leave the batch when they finish.

Why not ``model.generate``: at the batch sizes that make a GPU busy, Hugging Face's loop spends most of each step
outside the matmuls. Its dynamic cache concatenates (copies) every layer's keys and values at every step, its SDPA
path repeats the K/V heads of a grouped-query model (4x for Llama-3/Mistral) whenever a padding mask exists, it
synchronises with the host at every step, and a finished row keeps its seat until the longest row ends.

Here: the cache is allocated once (rows x prompt + new tokens) and written in place; during decoding the query
heads that share a K/V head are laid out as that head's "query positions" (one token each), so SDPA reads each
cached head once; the host checks for finished rows every few steps only, and drops them from the batch (cache
rows included) once enough have finished. The prefill runs the ordinary causal + padding attention, over
length-sorted chunks of rows each cut to its own longest prompt.
The model code is untouched: any transformers decoder that calls ``past_key_values.update(k, v, layer_idx)`` and
dispatches attention through ``AttentionInterface`` (Llama, Mistral, Qwen2, SmolLM2, ...) works.

On a GPU (``generation.cuda_graphs``, batches of up to ``GRAPH_MAX_ROWS``) each step after the prefill is replayed
as a CUDA graph (:mod:`titlegen.generate.graphs`): the cache is then "static": zero-filled, written at a position
held on the device, and read over its whole capacity with the columns not yet written masked out. On a GPU the
decoding attention itself is a Triton kernel (:mod:`titlegen.model.decode_kernel`), and so are the norms, the rotary
embedding and the SwiGLU's elementwise part (:mod:`titlegen.model.infer_kernels`).
"""

from __future__ import annotations

import logging

import torch

from titlegen.generate.graphs import GraphedStep
from titlegen.generate.rules import choose_tokens, process_scores
from titlegen.model import infer_kernels
from titlegen.model.attention import decode_attention

log = logging.getLogger("titlegen")

CHECK_EVERY = 8  # steps between host checks for finished rows (each check is a device sync)
COMPACT_FRACTION = 0.25  # drop finished rows once this share of the batch has finished
PREFILL_TOKENS = 32768  # prompt tokens per prefill forward: rows x the chunk's longest prompt
GRAPH_MIN_STEPS = 4  # record a graph only when this many steps remain (recording costs about two eager steps)
# Graphs pay at every batch measured (H200, 8B, 2,000 titles: 2,048 rows NF4 +5.8%, merged +7.2% over eager steps
# since the Triton decode kernel made the static layout's full-cache attention cheap; 1,024 rows 16% faster per
# step, 64 rows 4x). Bigger batches were never measured, so they keep eager steps.
GRAPH_MAX_ROWS = 2048


class SlotCache:
    """Per-layer K/V buffers of shape (rows, kv_heads, capacity, head_dim), zero-filled.

    The prefill writes the prompts in chunks of rows (``prefill_rows``), each chunk's columns right-aligned at the
    prompt's end (from ``prefill_start``). Then each decoding step writes one column at the current length; the
    caller advances the length once per forward (all layers write at the same offset), and the step reads the
    columns up to the new end. Static mode (for CUDA graphs): after :meth:`start_static`, a step writes at the
    device tensor ``write_at`` and reads the whole buffers, so a recorded step stays valid at every length."""

    def __init__(self, rows: int, capacity: int, static: bool = False) -> None:
        self.rows, self.capacity, self.static = rows, capacity, static
        self.length = 0
        self.write_at: torch.Tensor | None = None
        self.prefill_rows, self.prefill_start = slice(None), 0
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx not in self.keys:
            # Zeros: decoding reads the columns left of a shorter prompt (masked out). Garbage there could be NaN,
            # and attention's 0 x NaN would be NaN.
            shape = (self.rows, key.shape[1], self.capacity, key.shape[3])
            self.keys[layer_idx] = key.new_zeros(shape)
            self.values[layer_idx] = value.new_zeros(shape[:3] + (value.shape[3],))
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if self.write_at is not None:
            k.index_copy_(2, self.write_at, key)
            v.index_copy_(2, self.write_at, value)
            return k, v
        if self.length == 0:  # a prefill chunk: its prompts attend to themselves only
            end = self.prefill_start + key.shape[2]
            k[self.prefill_rows, :, self.prefill_start:end] = key
            v[self.prefill_rows, :, self.prefill_start:end] = value
            return key, value
        end = self.length + key.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache full: {end} > {self.capacity} positions")
        k[:, :, self.length:end] = key
        v[:, :, self.length:end] = value
        return k[:, :, :end], v[:, :, :end]

    def start_static(self) -> None:
        """From now on (after the prefill) write one column at ``write_at`` and read the whole cache."""
        device = next(iter(self.keys.values())).device
        self.write_at = torch.tensor([self.length], device=device)

    def advance(self, n: int) -> None:
        self.length += n
        if self.write_at is not None:
            self.write_at.fill_(self.length)

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.rows = len(rows)
        for store in (self.keys, self.values):
            for i, t in store.items():
                store[i] = t.index_select(0, rows)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


def prefill_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, P) padding mask -> (B, 1, P, P) causal + padding mask. A padding query attends to itself only, so no
    softmax row is empty (its output is never used)."""
    p = mask.shape[1]
    causal = torch.ones(p, p, dtype=torch.bool, device=mask.device).tril()
    full = causal[None] & mask[:, None, :]
    full |= torch.eye(p, dtype=torch.bool, device=mask.device)[None]
    return full[:, None]


def _logits(model, ids, positions, mask4d, cache: SlotCache) -> torch.Tensor:
    # The last position as an index tensor, not ``logits_to_keep=1``: that keeps a strided view of the hidden
    # states, whose LM head runs as one matrix-vector product per row, each reading the whole (vocab x hidden)
    # weight (H200, 8B: 83 ms per prefill chunk of 368 rows); the index copies the rows out first, one matmul.
    last = 1 if ids.shape[1] == 1 else torch.tensor([ids.shape[1] - 1], device=ids.device)
    out = model(input_ids=ids, position_ids=positions, attention_mask=mask4d, past_key_values=cache,
                use_cache=True, logits_to_keep=last)
    return out.logits[:, -1].float()


def prefill(model, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: SlotCache) -> torch.Tensor:
    """Next-token logits after each prompt. The rows (sorted longest prompt first) go in chunks of about
    ``PREFILL_TOKENS``, each cut to its own longest prompt, so the left padding of short prompts is not computed
    (in one length-sorted batch of 2,000 real titles it would be a third of the prefill)."""
    lengths = mask.sum(1).tolist()
    rows, width = ids.shape
    logits, start = [], 0
    while start < rows:
        longest = max(lengths[start], 1)
        stop = min(rows, start + max(1, PREFILL_TOKENS // longest))
        cols = slice(width - longest, width)
        cache.prefill_rows, cache.prefill_start = slice(start, stop), width - longest
        chunk = slice(start, stop)
        logits.append(_logits(model, ids[chunk, cols], positions[chunk, cols], prefill_mask(mask[chunk, cols]), cache))
        start = stop
    cache.advance(width)
    return torch.cat(logits)


class DecodeSteps:
    """The one-token steps after the prefill. Dynamic: attention over the filled part of the cache. Static: over
    the whole cache, each step replayed as a CUDA graph (recorded again when rows leave the batch, if at least
    ``GRAPH_MIN_STEPS`` steps remain; eager otherwise, and on a CPU)."""

    def __init__(self, model, cache: SlotCache, kv_mask: torch.Tensor) -> None:
        self.model, self.cache, self.kv_mask = model, cache, kv_mask
        self.graphs = cache.static and kv_mask.is_cuda
        self.graph: GraphedStep | None = None
        self.columns = torch.arange(cache.capacity, device=kv_mask.device)
        if cache.static:
            cache.start_static()

    def _step(self, ids, positions, mask4d) -> torch.Tensor:
        return _logits(self.model, ids, positions, mask4d, self.cache)

    def __call__(self, token: torch.Tensor, position: torch.Tensor, width: int, steps_left: int) -> torch.Tensor:
        ids, positions = token[:, None], position[:, None]
        if not self.cache.static:
            logits = self._step(ids, positions, self.kv_mask[:, None, None, :width + 1])
        else:
            mask4d = (self.kv_mask & (self.columns <= width))[:, None, None, :]
            if self.graph is not None:
                logits = self.graph(ids, positions, mask4d)
            elif self.graphs and steps_left >= GRAPH_MIN_STEPS:
                logits = self._record(ids, positions, mask4d)
            else:
                logits = self._step(ids, positions, mask4d)
        self.cache.advance(1)
        return logits

    def _record(self, ids, positions, mask4d) -> torch.Tensor:
        """Record the step as a graph and return this step's logits; a model whose step cannot be recorded (e.g.
        one that reads values back to the host mid-step, as mixture-of-experts routing does) decodes eagerly."""
        try:
            self.graph = GraphedStep(self._step, ids, positions, mask4d)
        except RuntimeError as err:
            self.graphs = False
            log.warning("model.generation.cuda_graphs: this model's decoding step cannot be recorded as a CUDA graph "
                        "(%s); decoding without graphs", str(err).splitlines()[0][:200])
            return self._step(ids, positions, mask4d)  # writes the same cache column again: same values
        return self.graph.first

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.cache.keep_rows(rows)
        self.kv_mask = self.kv_mask[rows]
        self.graph = None  # it reads the old buffers


@torch.no_grad()
def generate_fast(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, settings,
                  eos_id: int, pad_id: int, no_repeat=None, static: bool | None = None) -> torch.Tensor:
    """Decode a left-padded batch. Returns (B, max_new_tokens) new token ids; after a row's EOS, ``pad_id``.
    ``static``: the CUDA-graph cache layout (default: ``settings.cuda_graphs`` on a GPU, up to ``GRAPH_MAX_ROWS``
    rows; on a CPU it runs the same layout eagerly, which the tests use)."""
    rows, prompt_len = input_ids.shape
    new = settings.max_new_tokens
    device = input_ids.device
    out = torch.full((rows, new), pad_id, dtype=torch.long, device=device)
    if new == 0:
        return out
    if static is None:
        static = settings.cuda_graphs and device.type == "cuda" and rows <= GRAPH_MAX_ROWS
    active = attention_mask.sum(1).argsort(descending=True, stable=True)  # original row of each row in the batch
    input_ids, mask = input_ids[active], attention_mask[active].bool()  # longest prompt first, for the prefill
    history = torch.cat([input_ids, out], dim=1)  # prompt + generated, for the repetition rules
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    cache = SlotCache(rows, prompt_len + new, static=static)
    with decode_attention(model), infer_kernels.switched_on(model):
        logits = prefill(model, input_ids, mask, positions, cache)
        # generated tokens are always attended
        steps = DecodeSteps(model, cache, torch.cat([mask, mask.new_ones(rows, new)], dim=1))
        position = positions[:, -1] + 1
        for step in range(new):
            width = prompt_len + step
            scores = process_scores(logits, history[:, :width], step, settings, eos_id, no_repeat)
            token = choose_tokens(scores, settings).masked_fill(finished, pad_id)
            out[active, step] = token
            history[:, width] = token
            finished |= token == eos_id
            if step == new - 1:
                break
            if (step + 1) % CHECK_EVERY == 0:
                done = int(finished.sum())
                if done == finished.numel():
                    break
                if done >= COMPACT_FRACTION * finished.numel():
                    keep = (~finished).nonzero().squeeze(1)
                    steps.keep_rows(keep)
                    active, finished, token, position = active[keep], finished[keep], token[keep], position[keep]
                    history = history[keep]
            logits = steps(token, position, width, steps_left=new - 1 - step)
            position = position + 1
    return out
