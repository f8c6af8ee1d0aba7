"""Prompt ids without tokenizing the whole template again for every row.

A prompt is ``prefix + title + suffix``, and the prefix (the instruction, often 200 characters) is the same for
every row. When the tokenizer's pre-tokenizer ends a piece where the title starts, BPE cannot merge across that
point, so ``ids(prefix + title + suffix) == ids(prefix) + ids(title + suffix)``: the prefix is tokenized once. That
holds for the regex pre-tokenizers of GPT-2, SmolLM and Llama 3 after a newline, but not for every tokenizer or
template (a space before ``{title}``, a tokenizer that prepends a space to every text, a post-processor that
appends EOS). So nothing is assumed: the first row of each distinct title start (its first ``KEY_CHARS``
characters, which is all a regex pre-tokenizer looks at across the boundary) is tokenized both ways; starts
where the two differ, and rows whose start was not checked yet, are tokenized whole. The ids are always the
whole-prompt ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

KEY_CHARS = 3
SENTINEL = "\ue000titlegen-title\ue000"  # a private-use marker no template writes itself

Tokenize = Callable[[list[str]], list[list[int]]]


class SplitPrompt:
    """Prompt ids for titles: ``head`` once, then only ``title + suffix`` per row, checked per title start.

    Args:
        render: The prompt text of a title.
        whole: Tokenizes whole prompt texts (with the special tokens a prompt gets).
        tail: Tokenizes text that follows the prefix (no special tokens).
    """

    def __init__(self, render: Callable[[str], str], parts: tuple[str, str], whole: Tokenize, tail: Tokenize) -> None:
        self.render, (prefix, self.suffix) = render, parts
        self._whole, self._tail = whole, tail
        self.head = whole([prefix])[0]
        self.same: dict[str, bool] = {}  # title start -> whether the split ids equal the whole ids

    def ids(self, titles: Sequence[str]) -> list[list[int]]:
        self._check_new_starts(titles)
        split = [i for i, t in enumerate(titles) if self.same[t[:KEY_CHARS]]]
        whole = [i for i, t in enumerate(titles) if not self.same[t[:KEY_CHARS]]]
        out: list[list[int]] = [[] for _ in titles]
        for i, ids in zip(split, self._tail([titles[i] + self.suffix for i in split]) if split else []):
            out[i] = self.head + ids
        for i, ids in zip(whole, self._whole([self.render(titles[i]) for i in whole]) if whole else []):
            out[i] = ids
        return out

    def _check_new_starts(self, titles: Sequence[str]) -> None:
        first: dict[str, str] = {}
        for t in titles:
            if t[:KEY_CHARS] not in self.same:
                first.setdefault(t[:KEY_CHARS], t)
        if not first:
            return
        probes = list(first.values())
        wholes = self._whole([self.render(t) for t in probes])
        tails = self._tail([t + self.suffix for t in probes])
        for key, whole, tail in zip(first, wholes, tails):
            self.same[key] = self.head + tail == whole

    @property
    def pays(self) -> bool:
        """False once most title starts have failed the check (say, a space before ``{title}`` that BPE merges
        into the title's first word): checking them all would then cost more than tokenizing whole."""
        return len(self.same) < 32 or 2 * sum(self.same.values()) >= len(self.same)


def template_parts(render: Callable[[str], str]) -> tuple[str, str] | None:
    """(prefix, suffix) when ``render`` puts the title in exactly one place, verbatim; else None."""
    text = render(SENTINEL)
    if text.count(SENTINEL) != 1:
        return None
    prefix, suffix = text.split(SENTINEL)
    for probe in ("Widget 12-Pack", "x"):  # a template that transforms its input is tokenized whole
        if render(probe) != prefix + probe + suffix:
            return None
    return prefix, suffix
