"""Padding-free packing: several whole examples in one row, with the boundaries the attention needs.

A packed batch is one row of concatenated examples with per-example ``position_ids`` (RoPE restarts at 0) and
cumulative sequence lengths ``cu_seq_lens`` that mark the boundaries; :mod:`titlegen.model.attention`
(``titlegen_varlen``) keeps each example attending only to itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from titlegen.data.encoding import IGNORE_INDEX, example_labels


def collate_packed(examples: Sequence[dict], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Concatenate ``examples`` into one row. Each example's first label is ignored, so no token is ever
    predicted across a boundary. The row is padded at the end with one dummy segment when asked."""
    ids, labels, positions, bounds = [], [], [], [0]
    for e in examples:
        n = len(e["input_ids"])
        ids += e["input_ids"]
        labels += [IGNORE_INDEX] + list(example_labels(e)[1:])
        positions += range(n)
        bounds.append(bounds[-1] + n)
    pad = -len(ids) % pad_to_multiple_of
    if pad:  # a separate trailing segment of padding: attends to itself only, never to real tokens
        ids += [pad_id] * pad
        labels += [IGNORE_INDEX] * pad
        positions += range(pad)
        bounds.append(bounds[-1] + pad)
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    return {
        "input_ids": torch.tensor([ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([positions]),
        "cu_seq_lens": torch.tensor(bounds, dtype=torch.int32),
        "max_length": torch.tensor(max(lengths)),
        "num_tokens": torch.tensor(bounds[-1] - pad),
    }
