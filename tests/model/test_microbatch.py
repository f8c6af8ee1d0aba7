"""Splitting a batch for the out-of-memory back-off: whole examples, nothing lost, boundaries kept."""

from __future__ import annotations

import torch

from titlegen.data.encoding import IGNORE_INDEX, collate_train
from titlegen.data.packing import collate_packed
from titlegen.model.microbatch import GradSnapshot, rows_in, split_batch

EXAMPLES = [{"input_ids": list(range(10, 10 + n)), "labels": [IGNORE_INDEX] * 2 + list(range(12, 10 + n))}
            for n in (5, 3, 7, 4, 6)]


def _targets(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def test_a_padded_batch_splits_into_consecutive_rows():
    batch = collate_train(EXAMPLES, pad_id=0)
    parts = split_batch(batch, 2)
    assert [rows_in(p) for p in parts] == [2, 3]  # rounded halves, every row once
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(torch.cat([p[key] for p in parts]), batch[key])
    assert sum(_targets(p) for p in parts) == _targets(batch)
    assert len(split_batch(batch, 99)) == 5  # never an empty part


def test_a_packed_batch_splits_at_example_boundaries():
    batch = collate_packed(EXAMPLES, pad_id=0, pad_to_multiple_of=8)  # 25 tokens + a padding segment of 7
    parts = split_batch(batch, 3)
    assert sum(rows_in(p) for p in parts) == rows_in(batch) == 6
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(torch.cat([p[key] for p in parts], dim=1), batch[key])
    for p in parts:
        bounds = p["cu_seq_lens"].tolist()
        assert bounds[0] == 0 and bounds[-1] == p["input_ids"].shape[1]
        assert int(p["max_length"]) == max(b - a for a, b in zip(bounds, bounds[1:]))
        assert all(p["position_ids"][0, a] == 0 for a in bounds[:-1])  # each part starts at an example
    assert sum(_targets(p) for p in parts) == _targets(batch)  # no target crosses a cut


def test_a_grad_snapshot_puts_back_the_gradients_of_the_step_start():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    a.grad = torch.full((3,), 0.5)
    snapshot = GradSnapshot([a, b])
    (a.sum() * 2 + b.sum()).backward()
    snapshot.restore()
    assert torch.equal(a.grad, torch.full((3,), 0.5)) and b.grad is None
