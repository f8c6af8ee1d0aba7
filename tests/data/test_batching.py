import torch

from titlegen.data.batching import LengthGroupedBatchSampler, ResumableDataLoader
from titlegen.model.schedule import ScheduleSettings, lr_factor


def test_length_grouping_covers_everything_once_and_cuts_padding():
    lengths = [(i * 37) % 500 + 5 for i in range(1000)]
    sampler = LengthGroupedBatchSampler(lengths, batch_size=8, seed=3, group=64)
    batches = sampler.batches()
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert len(batches) == len(sampler) == 125

    def padded(bs):
        return sum(max(lengths[i] for i in b) * len(b) for b in bs)

    plain = LengthGroupedBatchSampler(lengths, batch_size=8, seed=3, group=1).batches()
    assert padded(batches) < 0.6 * padded(plain)


def test_epochs_differ_and_repeat_with_the_seed():
    sampler = LengthGroupedBatchSampler(list(range(100)), batch_size=4, seed=0)
    first = sampler.batches()
    sampler.set_epoch(1)
    assert sampler.batches() != first
    sampler.set_epoch(0)
    assert sampler.batches() == first


def test_longest_packed_row_of_the_epoch():
    lengths = [(i * 37) % 500 + 5 for i in range(1000)]
    sampler = LengthGroupedBatchSampler(lengths, batch_size=8, seed=3, packed=True)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        assert sampler.longest_batch_tokens() == max(sum(lengths[i] for i in b) for b in sampler.batches())
    assert LengthGroupedBatchSampler([], batch_size=8).longest_batch_tokens() == 0


def test_eval_order_is_longest_first():
    sampler = LengthGroupedBatchSampler([3, 9, 1, 7], batch_size=2, shuffle=False)
    assert sampler.batches() == [[1, 3], [0, 2]]


def _loader(n=40, bs=4, workers=0):
    sampler = LengthGroupedBatchSampler([i % 7 for i in range(n)], bs, seed=5)
    return ResumableDataLoader(list(range(n)), batch_sampler=sampler, num_workers=workers,
                               collate_fn=lambda items: torch.tensor(items))


def test_resumable_loader_continues_mid_epoch():
    full = [b.tolist() for b in _loader()]
    loader = _loader()
    it = iter(loader)
    seen = [next(it).tolist() for _ in range(3)]
    state = loader.state_dict()
    assert state == {"epoch": 0, "batches": 3}
    resumed = _loader()
    resumed.load_state_dict(state)
    assert seen + [b.tolist() for b in resumed] == full
    assert [b.tolist() for b in resumed] == full  # the skip applies once, to the resumed epoch only


def test_resume_from_an_epoch_end_starts_the_next_epoch_whole():
    loader = _loader()
    list(loader)
    state = loader.state_dict()
    resumed = _loader()
    resumed.load_state_dict(state)
    resumed.batch_sampler.set_epoch(1)  # what Lightning does at the next epoch's start
    assert len(list(resumed)) == len(loader)


def test_schedule_warmup_then_decay():
    s = ScheduleSettings(kind="linear", warmup_steps=4)
    factors = [lr_factor(i, 20, s) for i in range(20)]
    assert factors[:4] == [0.2, 0.4, 0.6, 0.8] and factors[4] == 1.0
    assert all(a >= b for a, b in zip(factors[4:], factors[5:])) and factors[-1] < 0.07
    cos = ScheduleSettings(kind="cosine", warmup_ratio=0.1, min_lr_ratio=0.1)
    assert abs(lr_factor(99, 100, cos) - 0.1) < 1e-3
    assert lr_factor(50, 100, ScheduleSettings(kind="constant", warmup_steps=2)) == 1.0


def test_predict_token_budget_batches():
    from titlegen.data.batching import cut_batches

    lengths = [10, 9, 8, 5, 5, 5, 5, 2, 2, 2, 2, 2]
    order = list(range(len(lengths)))
    batches = cut_batches(order, lengths, max_rows=4, max_tokens=20)
    assert batches == [[0, 1], [2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert all(len(b) * lengths[b[0]] <= 20 for b in batches)
    assert [len(b) for b in cut_batches(order, lengths, max_rows=5)] == [5, 5, 2]
