"""Batch samplers that cut padding, and a DataLoader that resumes mid-epoch on exactly the same batches."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

from torch.utils.data import DataLoader, Sampler


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Shuffled batches of examples of similar length.

    Each epoch: shuffle with ``seed + epoch``, cut into windows of ``batch_size * group`` examples, sort each
    window by length, cut it into batches and shuffle the batches. Similar lengths share a batch (little
    padding) while the order stays random. ``skip`` drops the first batches of the epoch (mid-epoch resume).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, shuffle: bool = True,
                 group: int = 64) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.shuffle, self.group = shuffle, group
        self.epoch, self.skip = 0, 0
        self.sampler = _EpochRelay(self)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        if not self.shuffle:  # evaluation: longest first, so an out-of-memory shows up at once
            order.sort(key=lambda i: -self.lengths[i])
            return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        rng = random.Random(self.seed + self.epoch)
        rng.shuffle(order)
        window = self.batch_size * self.group
        out: list[list[int]] = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start:start + window], key=lambda i: self.lengths[i])
            out.extend(chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        rng.shuffle(out)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()[self.skip:]

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)


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
