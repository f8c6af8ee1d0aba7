"""Token-level encoding: prompt and response encoded separately, the loss masked on the prompt, EOS appended as
an id that survives truncation; padding (right for training, left for generation) happens only in the collates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from titlegen.data.prompts import PromptTemplate

IGNORE_INDEX = -100
MAX_CHARS_PER_TOKEN = 64  # generous: BPE tokens of real text average ~4 characters


@dataclass
class Encoded:
    """One training example: ``labels`` is ``IGNORE_INDEX`` on prompt tokens, then the response and EOS."""

    input_ids: list[int]
    labels: list[int]


def join_prompt_response(prompt: list[int], response: list[int], eos_id: int, max_length: int) -> Encoded | None:
    """Concatenate, truncating the response (never the EOS) to fit ``max_length``; None if the prompt alone
    leaves no room for one response token."""
    room = max_length - len(prompt) - 1
    if room < 1:
        return None
    target = list(response[:room]) + [eos_id]
    return Encoded(input_ids=list(prompt) + target, labels=[IGNORE_INDEX] * len(prompt) + target)


class Encoder:
    """Turns titles into prompt ids and (title, content) pairs into training examples for one tokenizer."""

    def __init__(self, tokenizer, prompt: PromptTemplate, max_length: int) -> None:
        self.tokenizer, self.prompt, self.max_length = tokenizer, prompt, max_length
        self.eos_id: int = tokenizer.eos_token_id
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    def prompt_texts(self, titles: Sequence[str]) -> list[str]:
        if not self.prompt.chat:
            return [self.prompt.render(t) for t in titles]
        return [
            self.tokenizer.apply_chat_template(self.prompt.chat_messages(t), tokenize=False, add_generation_prompt=True)
            for t in titles
        ]

    def prompt_ids(self, titles: Sequence[str]) -> list[list[int]]:
        texts = self.prompt_texts(titles)
        # A chat template writes its own BOS; letting the tokenizer add another would double it.
        add_special = not self.prompt.chat
        return self.tokenizer(list(texts), add_special_tokens=add_special)["input_ids"]

    def response_ids(self, contents: Sequence[str]) -> list[list[int]]:
        # Only the first max_length tokens can be kept: cut the text first, so a 50 MB description costs what a
        # long one does (tokenizing it whole peaked at 7 GB). No token is that long, so the kept ids are the same.
        limit = self.max_length * MAX_CHARS_PER_TOKEN
        return self.tokenizer([c[:limit] for c in contents], add_special_tokens=False)["input_ids"]

    def encode(self, titles: Sequence[str], contents: Sequence[str]) -> list[Encoded | None]:
        prompts, responses = self.prompt_ids(titles), self.response_ids(contents)
        return [join_prompt_response(p, r, self.eos_id, self.max_length) for p, r in zip(prompts, responses)]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def collate_train(examples: Sequence[dict], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: ``input_ids`` with ``pad_id``, ``labels`` with ``IGNORE_INDEX``.

    Padding is masked by position (attention_mask/labels), never by token id, so pad == eos is harmless.
    """
    width = _round_up(max(len(e["input_ids"]) for e in examples), pad_to_multiple_of)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.as_tensor(e["input_ids"])
        labels[row, :n] = torch.as_tensor(e["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collate_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts for batched generation, so every row's next token follows its last prompt token."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        if p:
            ids[row, width - len(p):] = torch.as_tensor(p)
            mask[row, width - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask}
