"""The DataModule reads what grows with the file in whole Arrow columns, never row by row."""

from __future__ import annotations

from tests.helpers import FIXTURE_ROWS, write_jsonl
from titlegen.data.datamodule import TitleDataModule


def test_the_sampler_gets_its_lengths_without_formatting_rows(tmp_path, tiny_model_dir, monkeypatch):
    from datasets.formatting import formatting

    dm = TitleDataModule(path=str(write_jsonl(tmp_path / "trn.json", FIXTURE_ROWS)), tokenizer=str(tiny_model_dir),
                         cache_dir=str(tmp_path / "cache"), val_fraction=0.25, max_length=256, batch_size=4)
    dm.setup("fit")

    whole = formatting.Formatter.__call__

    def no_rows(self, pa_table, query_type):  # at 1.5M rows, formatting each one took minutes before step 1
        assert query_type != "row", "a row of the dataset was formatted in Python"
        return whole(self, pa_table, query_type)

    monkeypatch.setattr(formatting.Formatter, "__call__", no_rows)
    loader = dm.train_dataloader()
    assert loader.batch_sampler.lengths == list(dm.splits["train"].with_format("arrow")["length"].to_pylist())
    monkeypatch.undo()
    assert sum(len(b["input_ids"]) for b in loader) == len(dm.splits["train"])


def test_the_longest_packed_row_of_the_epoch_is_known_before_it_comes(tmp_path, tiny_model_dir):
    """What ``model.backbone.training_graphs`` sizes its memory pool by: the epoch's longest packed row."""
    dm = TitleDataModule(path=str(write_jsonl(tmp_path / "trn.json", FIXTURE_ROWS)), tokenizer=str(tiny_model_dir),
                         cache_dir=str(tmp_path / "cache"), val_fraction=0.25, max_length=256, batch_size=4,
                         packing=True, pad_to_multiple_of=8)
    dm.setup("fit")
    assert dm.longest_train_row() is None  # no loader yet
    loader = dm.train_dataloader()
    longest = dm.longest_train_row()
    assert longest == max(b["input_ids"].shape[1] for b in loader) and longest % 8 == 0
