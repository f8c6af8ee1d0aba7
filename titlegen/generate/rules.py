"""Decoding rules applied to next-token scores, shared by titlegen's loop and transformers' ``generate``:
repetition penalty, no repeated n-grams, a minimum length, then greedy or sampled choice."""

from __future__ import annotations

import torch


class NoRepeatNGram:
    """Forbid any token that would complete an n-gram the row has already generated.

    Only tokens from column ``start`` on count (the generated ones, with ``start`` = the left-padded prompt's
    width): transformers' ``no_repeat_ngram_size`` also bans the prompt's n-grams, so a description could not
    repeat the product's own name ("Crème Brûlée" came out "crème brûlé"). Vectorized on the device: the stock
    processor walks every row in Python at every step, which dominates decoding time at large batch sizes.
    """

    def __init__(self, n: int, start: int = 0) -> None:
        if n < 1:
            raise ValueError("no_repeat_ngram_size must be >= 1")
        self.n, self.start = n, start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        input_ids = input_ids[:, self.start:]
        n, length = self.n, input_ids.shape[1]
        if length < n:
            return scores
        if n == 1:
            return scores.scatter(1, input_ids, float("-inf"))
        prefix = input_ids[:, length - n + 1:]  # the last n-1 tokens
        windows = input_ids.unfold(1, n - 1, 1)[:, : length - n + 1]  # every earlier (n-1)-gram with a successor
        match = (windows == prefix[:, None, :]).all(-1)  # (batch, length - n + 1)
        followers = input_ids[:, n - 1:]
        # Adding (not writing) match flags: a token may follow both a matching and a non-matching window.
        hits = torch.zeros(scores.shape, dtype=torch.int32, device=scores.device)
        hits.scatter_add_(1, followers, match.to(torch.int32))
        return scores.masked_fill(hits > 0, float("-inf"))


def process_scores(scores: torch.Tensor, history: torch.Tensor, step: int, settings, eos_id: int,
                   no_repeat=None) -> torch.Tensor:
    """Apply the decoding rules to next-token scores (float32, (B, V)), in transformers' order."""
    if settings.repetition_penalty != 1.0:
        seen = scores.gather(1, history)
        seen = torch.where(seen < 0, seen * settings.repetition_penalty, seen / settings.repetition_penalty)
        scores = scores.scatter(1, history, seen)
    if no_repeat is not None:
        scores = no_repeat(history, scores)
    if step < settings.min_new_tokens:
        scores[:, eos_id] = float("-inf")
    return scores


def choose_tokens(scores: torch.Tensor, settings, generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy, or sampling with temperature, top-k and top-p (nucleus)."""
    if not settings.do_sample:
        return scores.argmax(-1)
    scores = scores / max(settings.temperature, 1e-5)
    if settings.top_k:
        kth = scores.topk(min(settings.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if settings.top_p < 1.0:
        ordered, order = scores.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        drop = probs.cumsum(-1) - probs > settings.top_p  # keep the smallest head whose mass reaches top_p
        scores = scores.scatter(1, order, ordered.masked_fill(drop, float("-inf")))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
