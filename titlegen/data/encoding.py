"""Token-level encoding: prompt and response encoded separately, the loss masked on the prompt, EOS appended as
an id that survives truncation; padding (right for training, left for generation) happens only in the collates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from titlegen.data.prompt_split import SplitPrompt, template_parts
from titlegen.data.prompts import PromptTemplate

IGNORE_INDEX = -100
MAX_CHARS_PER_TOKEN = 64  # generous: BPE tokens of real text average ~4 characters


@dataclass
class Encoded:
    """One training example: the prompt's ``prompt_length`` ids, then the response and EOS."""

    input_ids: list[int]
    prompt_length: int

    @property
    def labels(self) -> list[int]:
        """``IGNORE_INDEX`` on prompt tokens, then the response and EOS (what the loss predicts)."""
        return prompt_labels(self.input_ids, self.prompt_length)


def prompt_labels(input_ids: Sequence[int], prompt_length: int) -> list[int]:
    return [IGNORE_INDEX] * prompt_length + list(input_ids[prompt_length:])


def example_labels(example: Mapping) -> Sequence[int]:
    """An example's labels: given, or built from its ``prompt_length`` (the cached splits store that: half
    the size of a second token list)."""
    if "labels" in example:
        return example["labels"]
    return prompt_labels(example["input_ids"], example["prompt_length"])


def join_prompt_response(prompt: list[int], response: list[int], eos_id: int, max_length: int) -> Encoded | None:
    """Concatenate, truncating the response (never the EOS) to fit ``max_length``; None if the prompt alone
    leaves no room for one response token."""
    room = max_length - len(prompt) - 1
    if room < 1:
        return None
    return Encoded(input_ids=[*prompt, *response[:room], eos_id], prompt_length=len(prompt))


class Encoder:
    """Turns titles into prompt ids and (title, content) pairs into training examples for one tokenizer."""

    def __init__(self, tokenizer, prompt: PromptTemplate, max_length: int) -> None:
        self.tokenizer, self.prompt, self.max_length = tokenizer, prompt, max_length
        self.eos_id: int = tokenizer.eos_token_id
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self._split: SplitPrompt | None | bool = None  # built on first use (not pickled to workers)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_split": None}

    def render(self, title: str) -> str:
        """The prompt text of one title, through the chat template when the prompt asks for it."""
        if not self.prompt.chat:
            return self.prompt.render(title)
        return self.tokenizer.apply_chat_template(self.prompt.chat_messages(title), tokenize=False,
                                                  add_generation_prompt=True)

    def prompt_texts(self, titles: Sequence[str]) -> list[str]:
        return [self.render(t) for t in titles]

    def prompt_ids(self, titles: Sequence[str]) -> list[list[int]]:
        if self._split is None:
            parts = template_parts(self.render)
            self._split = SplitPrompt(self.render, parts, self._whole_prompts, self._tails) if parts else False
        if self._split and self._split.pays:
            return self._split.ids(titles)
        return self._whole_prompts(self.prompt_texts(titles))

    def _whole_prompts(self, texts: list[str]) -> list[list[int]]:
        # A chat template writes its own BOS; letting the tokenizer add another would double it.
        return self.ids(texts, add_special_tokens=not self.prompt.chat)

    def _tails(self, texts: list[str]) -> list[list[int]]:
        return self.ids(texts, add_special_tokens=False)

    def ids(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        """Token ids of each text: straight from the Rust tokenizer when that gives the same ids (it skips the
        Python objects transformers builds per text, a tenth of the preparation), else through transformers."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and backend.truncation is None and backend.padding is None:
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
        return self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]

    def response_ids(self, contents: Sequence[str]) -> list[list[int]]:
        # Only the first max_length tokens can be kept: cut the text first, so a 50 MB description costs what a
        # long one does (tokenizing it whole peaked at 7 GB). No token is that long, so the kept ids are the same.
        limit = self.max_length * MAX_CHARS_PER_TOKEN
        return self.ids([c[:limit] for c in contents], add_special_tokens=False)

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
        labels[row, :n] = torch.as_tensor(example_labels(e))
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
