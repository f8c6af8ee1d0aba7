"""titlegen's own batched decoding loop: a preallocated KV cache, grouped-query attention without copying K/V,
and rows that leave the batch when they finish.

Why not ``model.generate``: at the batch sizes that make a GPU busy, Hugging Face's loop spends most of each step
outside the matmuls. Its dynamic cache concatenates (copies) every layer's keys and values at every step, its SDPA
path repeats the K/V heads of a grouped-query model (4x for Llama-3/Mistral) whenever a padding mask exists, it
synchronises with the host at every step, and a finished row keeps its seat until the longest row ends.

Here: the cache is allocated once (rows x prompt + new tokens) and written in place; during decoding the query
heads that share a K/V head are laid out as that head's "query positions" (one token each), so SDPA reads each
cached head once; the host checks for finished rows every few steps only, and drops them from the batch (cache
rows included) once enough have finished. Prefill runs the ordinary causal + padding attention once per batch.
The model code is untouched: any transformers decoder that calls ``past_key_values.update(k, v, layer_idx)`` and
dispatches attention through ``AttentionInterface`` (Llama, Mistral, Qwen2, SmolLM2, ...) works.
"""

from __future__ import annotations

import torch

from titlegen.generate.rules import choose_tokens, process_scores
from titlegen.model.attention import decode_attention

CHECK_EVERY = 8  # steps between host checks for finished rows (each check is a device sync)
COMPACT_FRACTION = 0.25  # drop finished rows once this share of the batch has finished


class SlotCache:
    """Per-layer K/V buffers of shape (rows, kv_heads, capacity, head_dim), filled left to right.

    ``update`` writes the new keys/values at the current length and returns views up to the new end; the caller
    advances the length once per forward (all layers write at the same offset)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.length = 0
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx not in self.keys:
            shape = (key.shape[0], key.shape[1], self.capacity, key.shape[3])
            self.keys[layer_idx] = key.new_empty(shape)
            self.values[layer_idx] = value.new_empty(shape[:3] + (value.shape[3],))
        end = self.length + key.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache full: {end} > {self.capacity} positions")
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k[:, :, self.length:end] = key
        v[:, :, self.length:end] = value
        return k[:, :, :end], v[:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def keep_rows(self, rows: torch.Tensor) -> None:
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


def _last_logits(model, ids, positions, mask4d, cache: SlotCache) -> torch.Tensor:
    out = model(input_ids=ids, position_ids=positions, attention_mask=mask4d, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    cache.advance(ids.shape[1])
    return out.logits[:, -1].float()


@torch.no_grad()
def generate_fast(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, settings,
                  eos_id: int, pad_id: int, no_repeat=None) -> torch.Tensor:
    """Decode a left-padded batch. Returns (B, max_new_tokens) new token ids; after a row's EOS, ``pad_id``."""
    rows, prompt_len = input_ids.shape
    new = settings.max_new_tokens
    device = input_ids.device
    out = torch.full((rows, new), pad_id, dtype=torch.long, device=device)
    if new == 0:
        return out
    mask = attention_mask.bool()
    kv_mask = torch.cat([mask, mask.new_ones(rows, new)], dim=1)  # generated tokens are always attended
    history = torch.cat([input_ids, out], dim=1)  # prompt + generated, for the repetition rules
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    active = torch.arange(rows, device=device)  # original row of each row still in the batch
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    cache = SlotCache(prompt_len + new)
    with decode_attention(model):
        logits = _last_logits(model, input_ids, positions, prefill_mask(mask), cache)
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
                    cache.keep_rows(keep)
                    active, finished, token, position = active[keep], finished[keep], token[keep], position[keep]
                    kv_mask, history = kv_mask[keep], history[keep]
            step_mask = kv_mask[:, None, None, :width + 1]
            logits = _last_logits(model, token[:, None], position[:, None], step_mask, cache)
            position = position + 1
    return out
