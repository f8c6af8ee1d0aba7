"""Batched generation from left-padded prompts, shared by validation samples, predict and evaluation: titlegen's
decoding loop or transformers' ``generate`` (``generation.engine``), decoded to text up to the EOS."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from titlegen.generate.loop import generate_fast
from titlegen.generate.rules import NoRepeatNGram
from titlegen.generate.settings import GenerationSettings
from titlegen.model.attention import supports_fast_decoding


def no_repeat_rule(settings: GenerationSettings, prompt_width: int) -> NoRepeatNGram | None:
    """The n-gram ban over generated tokens (the prompt's columns come first), or None when off."""
    return NoRepeatNGram(settings.no_repeat_ngram_size, prompt_width) if settings.no_repeat_ngram_size else None


def hf_kwargs(settings: GenerationSettings, eos_id: int, pad_id: int, prompt_width: int) -> dict:
    """Keyword arguments of transformers' ``generate`` for these settings (the same rules as our loop)."""
    from transformers import LogitsProcessorList

    rule = no_repeat_rule(settings, prompt_width)
    processors = LogitsProcessorList([rule] if rule else [])
    kwargs = dict(max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.min_new_tokens or None,
                  do_sample=settings.do_sample, eos_token_id=eos_id, pad_token_id=pad_id,
                  repetition_penalty=settings.repetition_penalty, logits_processor=processors, use_cache=True)
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k or None)
    else:  # keep the model's generation_config from adding sampling knobs to greedy decoding
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


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
        new_ids = generate_fast(model, ids, mask, settings, eos_id, pad_id, no_repeat_rule(settings, ids.shape[1]))
    else:
        new_ids = model.generate(input_ids=ids, attention_mask=mask, **hf_kwargs(settings, eos_id, pad_id, ids.shape[1]))
        new_ids = new_ids[:, ids.shape[1]:]
    results = []
    for row in new_ids.tolist():
        stopped = eos_id in row
        tokens = row[:row.index(eos_id)] if stopped else row
        text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        results.append(Generated(text=text, stopped=stopped, num_tokens=len(tokens)))
    return results
