"""Rows to score and their loaders, taken from a :class:`~titlegen.data.datamodule.TitleDataModule` passed in.

The DataModule keeps Lightning's hooks and its state; evaluation (``evaluate``, the validate/test generation
metrics, the validation samples in TensorBoard) asks it for its encoder, settings and splits through these
functions, so no caller needs to know more of it than its public attributes.
"""

from __future__ import annotations

from collections import Counter
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from torch.utils.data import DataLoader

from titlegen.data.batching import LengthGroupedBatchSampler
from titlegen.data.encoding import collate_prompts, collate_train
from titlegen.data.predict_csv import PredictInput
from titlegen.data.records import clean_records, iter_rows, sample_records
from titlegen.errors import TitlegenError

if TYPE_CHECKING:
    from titlegen.data.datamodule import TitleDataModule

Row = dict[str, str]  # {"title": ..., "content": ...}


def _rows(split) -> list[Row]:
    return [{"title": t, "content": c} for t, c in zip(split["title"], split["content"])]


def split_rows(dm: TitleDataModule, name: str) -> list[Row]:
    """(title, content) rows of a processed split, in split order; [] when the split is empty."""
    split = dm.splits.get(name)
    return [] if split is None else _rows(split)


def eval_rows(dm: TitleDataModule) -> tuple[list[Row], dict]:
    """The rows ``evaluate`` scores and where they came from: ``data.eval_path`` (cleaned like training data, file
    order; a seeded sample of ``data.max_records`` of them when set), else the test split of ``data.path``, else
    its validation split. The second value names the source and counts the rows dropped on the way."""
    if dm.eval_path:
        stats: Counter = Counter()
        records = clean_records(iter_rows(dm.eval_path, stats, dm.split.skip_bad_lines), stats)
        if dm.split.max_records is not None:  # the same seeded uniform sample as for training data
            records = sample_records(records, dm.split.max_records, dm.split.seed, stats)
        rows = [{"title": r.title, "content": r.content} for r in records]
        dropped = {k.removeprefix("dropped_"): v for k, v in stats.items() if k.startswith("dropped_") and v}
        source = {"path": str(Path(dm.eval_path).resolve()), "read": stats["read"], "dropped": dropped}
    else:
        dm.setup("validate")
        name = "test" if "test" in dm.splits else "val"
        if name not in dm.splits:
            raise TitlegenError("evaluate: set data.eval_path, or give data.path a test or validation split")
        rows = split_rows(dm, name)
        source = {"path": str(Path(dm.path).resolve()), "split": name}
    if not rows:
        raise TitlegenError(f"{dm.eval_path or dm.path}: no usable rows to evaluate")
    return rows, source


def generation_loader(dm: TitleDataModule, rows: list[Row]) -> DataLoader:
    """Left-padded prompt batches of ``rows`` (each batch's ``row`` holds the row indices)."""
    table = [[r["title"], r["content"]] for r in rows]
    source = PredictInput(Path(dm.eval_path or dm.path), ["title", "content"], table, [r["title"] for r in rows])
    return source.loader(dm.encoder, dm.eval_batch_size, max_tokens=dm.predict_max_tokens,
                         max_prompt_tokens=dm.max_prompt_tokens)


def loss_loader(dm: TitleDataModule, rows: list[Row]) -> DataLoader:
    """Encoded (prompt, reference) pairs of ``rows`` for the loss and perplexity on the references."""
    encoded = [e for e in dm.encoder.encode([r["title"] for r in rows], [r["content"] for r in rows]) if e]
    examples = [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]
    sampler = LengthGroupedBatchSampler([len(e["input_ids"]) for e in examples], dm.eval_batch_size, shuffle=False)
    collate = partial(collate_train, pad_id=dm.encoder.pad_id, pad_to_multiple_of=dm.pad_to)
    return DataLoader(examples, batch_sampler=sampler, collate_fn=collate)


def sample_rows(dm: TitleDataModule) -> list[Row]:
    """A few fixed validation rows whose generations are logged at each validation."""
    val = dm.splits.get("val")
    if val is None or dm.num_val_samples <= 0:
        return []
    return _rows(val.select(range(min(len(val), dm.num_val_samples))))


def sample_batch(dm: TitleDataModule, titles: list[str]) -> dict:
    """Left-padded prompts of ``titles``."""
    return collate_prompts(dm.encoder.prompt_ids(titles), dm.encoder.pad_id)
