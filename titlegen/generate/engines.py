"""Batched generation from left-padded prompts, shared by validation samples, predict and evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from titlegen.generate.loop import generate_fast, supports_fast_decoding

Engine = Literal["auto", "titlegen", "hf"]


@dataclass
class GenerationSettings:
    """Decoding settings.

    Attributes:
        max_new_tokens: Longest description, in tokens.
        min_new_tokens: Suppress EOS before this many tokens (benchmarks use it to make every row run to the end).
        do_sample: Sample instead of greedy decoding.
        temperature: Sampling temperature (with ``do_sample``).
        top_p: Nucleus sampling mass (with ``do_sample``).
        top_k: Sample among the k most likely tokens; 0 turns it off (with ``do_sample``).
        repetition_penalty: >1 discourages tokens already generated.
        no_repeat_ngram_size: Never repeat an n-gram of this many tokens (0: off). Small models loop under
            greedy decoding; 3 stops that without hurting the text.
        engine: ``titlegen`` (our decoding loop, :mod:`titlegen.generate.loop`: several times faster on a GPU),
            ``hf`` (transformers' ``generate``: ~20% faster per step on 2 CPU cores at small batches; slower for
            long outputs in big batches, where our finished rows leave), or
            ``auto``: titlegen on a GPU, hf elsewhere. Models whose attention cannot be swapped always use ``hf``.
    """

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 3
    engine: Engine = "auto"

    def __post_init__(self) -> None:
        if self.engine not in get_args(Engine):
            raise ValueError(f"generation.engine must be one of {get_args(Engine)}, got {self.engine!r}")

    def hf_kwargs(self, eos_id: int, pad_id: int) -> dict:
        from transformers import LogitsProcessorList

        processors = LogitsProcessorList([NoRepeatNGram(self.no_repeat_ngram_size)] if self.no_repeat_ngram_size else [])
        kwargs = dict(max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens or None,
                      do_sample=self.do_sample, eos_token_id=eos_id, pad_token_id=pad_id,
                      repetition_penalty=self.repetition_penalty, logits_processor=processors, use_cache=True)
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None)
        else:  # keep the model's generation_config from adding sampling knobs to greedy decoding
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


class NoRepeatNGram:
    """Forbid any token that would complete an n-gram already present in the row (prompt included), as
    transformers' ``no_repeat_ngram_size`` does, but vectorized on the device: the stock processor walks every
    row in Python at every step, which dominates decoding time at large batch sizes."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError("no_repeat_ngram_size must be >= 1")
        self.n = n

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
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


@dataclass
class Generated:
    text: str
    stopped: bool  # ended with EOS before max_new_tokens
    num_tokens: int


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer, batch: dict, settings: GenerationSettings) -> list[Generated]:
    """Generate for one left-padded batch; decode only the new tokens, up to (not including) the EOS."""
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ours = settings.engine == "titlegen" or (settings.engine == "auto" and ids.is_cuda)
    if ours and supports_fast_decoding(model):
        no_repeat = NoRepeatNGram(settings.no_repeat_ngram_size) if settings.no_repeat_ngram_size else None
        new_ids = generate_fast(model, ids, mask, settings, eos_id, pad_id, no_repeat)
    else:
        new_ids = model.generate(input_ids=ids, attention_mask=mask, **settings.hf_kwargs(eos_id, pad_id))
        new_ids = new_ids[:, ids.shape[1]:]
    results = []
    for row in new_ids.tolist():
        stopped = eos_id in row
        tokens = row[:row.index(eos_id)] if stopped else row
        text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        results.append(Generated(text=text, stopped=stopped, num_tokens=len(tokens)))
    return results
