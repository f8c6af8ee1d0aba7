"""Predict input: every row of a CSV of titles, kept whole so the output can repeat all input columns."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from titlegen.data.batching import cut_batches, world_rank
from titlegen.data.cleaning import clean_text
from titlegen.data.encoding import Encoder, collate_prompts
from titlegen.data.files import check_readable
from titlegen.data.records import BadLines, iter_csv_lists
from titlegen.errors import TitlegenError

log = logging.getLogger("titlegen")


@dataclass
class PredictInput:
    """The rows of a predict CSV, in file order, every field kept (columns may repeat), with cleaned titles."""

    path: Path
    header: list[str]
    rows: list[list[str]]
    titles: list[str]

    def loader(self, encoder: Encoder, batch_size: int, skip: Collection[int] = (),
               max_tokens: int | None = None, max_prompt_tokens: int | None = None, shard: bool = False) -> DataLoader:
        """Batches of left-padded prompts, longest first (similar lengths share a batch; an out-of-memory
        error shows up at once), of at most ``batch_size`` rows and, with ``max_tokens``, at most that many
        rows x longest prompt. Rows with an empty title and rows in ``skip`` get no batch. A prompt over
        ``max_prompt_tokens`` (the model's context less the tokens to generate) has its title cut to fit. With
        ``shard``, on several devices, each rank gets every world-th batch (the same batches as on one)."""
        todo = [i for i, t in enumerate(self.titles) if t and i not in skip]
        prompts = dict(zip(todo, encoder.prompt_ids([self.titles[i] for i in todo]) if todo else []))
        if max_prompt_tokens is not None:
            self._cut_long_titles(encoder, prompts, max_prompt_tokens)
        lengths = {i: len(p) for i, p in prompts.items()}
        order = sorted(todo, key=lambda i: -lengths[i])
        batches = [[(i, prompts[i]) for i in b] for b in cut_batches(order, lengths, batch_size, max_tokens)]
        if shard:
            world, rank = world_rank()
            batches = batches[rank::world]

        def collate(batch: list[tuple[int, list[int]]]) -> dict:
            out = collate_prompts([p for _, p in batch], encoder.pad_id)
            out["row"] = torch.tensor([i for i, _ in batch])
            return out

        return DataLoader(batches, batch_size=None, collate_fn=collate)

    def _cut_long_titles(self, encoder: Encoder, prompts: dict[int, list[int]], limit: int) -> None:
        """Shorten the titles whose prompt is over ``limit`` tokens (the template stays whole), with a warning
        naming the rows: generating past the model's context would fail or run on garbage positions."""
        long = [i for i, p in prompts.items() if len(p) > limit]
        if not long:
            return
        template = len(encoder.prompt_ids([""])[0])
        if template >= limit:
            raise TitlegenError(f"the prompt template alone takes {template} tokens; the model's context leaves "
                                f"{limit} beside model.generation.max_new_tokens")
        for i in long:
            lo, hi = 0, len(self.titles[i])  # the longest title prefix whose prompt fits (binary search)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if len(encoder.prompt_ids([self.titles[i][:mid]])[0]) <= limit else (lo, mid - 1)
            prompts[i] = encoder.prompt_ids([self.titles[i][:lo]])[0]
        rows = ", ".join(str(i + 1) for i in long[:10]) + (" ..." if len(long) > 10 else "")
        log.warning("%s: %d title(s) too long for the model's context were cut to fit %d prompt tokens (data "
                    "rows %s)", self.path, len(long), limit, rows)


def read_predict_csv(path: str | Path) -> PredictInput:
    """Read a CSV with a ``title`` column; warn (not fail) about rows whose title is empty."""
    path = check_readable(path)
    if path.name.lower().removesuffix(".gz").rsplit(".", 1)[-1] != "csv":
        raise TitlegenError(f"{path}: predict reads a CSV file with a 'title' column")
    table = [(header, fields) for _, header, fields in iter_csv_lists(path, BadLines(False, Counter()), ("title",))]
    if not table:
        raise TitlegenError(f"{path}: no rows under the header (expected one title per row)")
    header, rows = table[0][0], [fields for _, fields in table]
    title = header.index("title")
    titles = [clean_text(r[title]) for r in rows]
    empty = [i for i, t in enumerate(titles) if not t]
    if empty:
        log.warning("%s: %d row(s) with an empty title get an empty description (first at data row %d)",
                    path, len(empty), empty[0] + 1)
    return PredictInput(path=path, header=header, rows=rows, titles=titles)
