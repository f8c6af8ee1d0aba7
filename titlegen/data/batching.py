"""Batch samplers that cut padding, and a DataLoader that resumes mid-epoch on exactly the same batches."""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch.utils.data import DataLoader, Sampler


def cut_batches(order: Sequence[int], lengths: Sequence[int] | Mapping[int, int], max_rows: int | None = None,
                max_tokens: int | None = None, packed: bool = False) -> list[list[int]]:
    """Cut ``order`` into consecutive batches of at most ``max_rows`` examples whose cost stays within
    ``max_tokens``: the sum of lengths when ``packed``, else rows x longest row (the padded size). An example
    alone over the budget forms a batch of its own."""
    out: list[list[int]] = []
    batch: list[int] = []
    total = longest = 0
    for i in order:
        n = lengths[i]
        cost = total + n if packed else (len(batch) + 1) * max(longest, n)
        full = max_rows is not None and len(batch) >= max_rows
        if batch and (full or (max_tokens is not None and cost > max_tokens)):
            out.append(batch)
            batch, total, longest = [], 0, 0
        batch.append(i)
        total, longest = total + n, max(longest, n)
    return out + ([batch] if batch else [])


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Shuffled batches of examples of similar length, of a fixed size or within a token budget.

    Each epoch: shuffle with ``seed + epoch``, cut into windows of ``batch_size * group`` examples, sort each
    window by length, cut it into batches and shuffle the batches. Similar lengths share a batch (little
    padding) while the order stays random. With ``max_tokens`` a batch takes examples while its cost stays within
    the budget: rows x longest row when padded, the sum of lengths when ``packed`` (an example longer than the
    budget forms a batch of its own). ``skip`` drops the first batches of the epoch (mid-epoch resume).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, shuffle: bool = True,
                 group: int = 64, max_tokens: int | None = None, packed: bool = False) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        # One C-level conversion: iterating a column of a 1.5M-row table in Python took minutes.
        self.lengths = lengths.tolist() if hasattr(lengths, "tolist") else list(lengths)
        self.batch_size, self.seed = batch_size, seed
        self.shuffle, self.group, self.max_tokens, self.packed = shuffle, group, max_tokens, packed
        self.epoch, self.skip = 0, 0
        self._count: tuple[int, int] | None = None  # (epoch, number of batches) for token budgets
        self.sampler = _EpochRelay(self)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _cut(self, order: list[int]) -> list[list[int]]:
        if self.max_tokens is None:
            return cut_batches(order, self.lengths, max_rows=self.batch_size)
        return cut_batches(order, self.lengths, max_tokens=self.max_tokens, packed=self.packed)

    def batches(self) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        if not self.shuffle:  # evaluation: longest first, so an out-of-memory shows up at once
            order.sort(key=lambda i: -self.lengths[i])
            return self._cut(order)
        rng = random.Random(self.seed + self.epoch)
        rng.shuffle(order)
        if self.packed:  # packing has no padding to save: keep the order fully random
            return self._cut(order)
        window = self.batch_size * self.group if self.max_tokens is None else len(order)
        out: list[list[int]] = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start:start + window], key=lambda i: self.lengths[i])
            out.extend(self._cut(chunk))
        rng.shuffle(out)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._shard(self.batches())[self.skip:]

    def longest_batch_tokens(self) -> int:
        """The most example tokens in one batch of this epoch (a packed row's length, before its padding)."""
        return max((sum(self.lengths[i] for i in b) for b in self.batches()), default=0)

    def __len__(self) -> int:
        if self.max_tokens is None:
            total = -(-len(self.lengths) // self.batch_size)
        else:
            if self._count is None or self._count[0] != self.epoch:
                self._count = (self.epoch, len(self.batches()))
            total = self._count[1]
        world, _ = world_rank()
        return total if world == 1 else total // world

    @staticmethod
    def _shard(batches: list[list[int]]) -> list[list[int]]:
        """Under DDP every rank takes every world-th batch of the same epoch order, the same number on each
        rank (the last few batches are dropped when the count does not divide), so no rank waits for another."""
        world, rank = world_rank()
        if world == 1:
            return batches
        per_rank = len(batches) // world
        return batches[rank:per_rank * world:world]


def world_rank() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class _EpochRelay:
    """Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler``, not on the batch sampler."""

    def __init__(self, owner: LengthGroupedBatchSampler) -> None:
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position in the epoch is saved in Lightning checkpoints.

    The position (epoch, batches handed out) goes into the checkpoint through the DataModule's ``state_dict``
    (Lightning's own loader-state restore is skipped when ``estimated_stepping_batches`` built the loader before
    the restore), so a resumed run skips the batches it already trained on instead of starting the epoch over.
    Counting happens where batches leave the loader, so worker prefetching does not skew it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._yielded = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches already trained in it)

    def __iter__(self) -> Iterator[Any]:
        # A generator: this body first runs at the first next(), after Lightning has called set_epoch.
        sampler = self.batch_sampler
        if self._resume is not None and self._resume[0] == sampler.epoch:
            sampler.skip = self._resume[1]
        self._resume = None
        self._yielded = sampler.skip
        try:
            for batch in super().__iter__():
                self._yielded += 1
                yield batch
        finally:
            sampler.skip = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.batch_sampler.epoch, "batches": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (state["epoch"], state["batches"])
