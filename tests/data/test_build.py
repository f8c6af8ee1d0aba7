"""The cache build (parallel, resumable, vectorized choices) gives exactly what the plain record pipeline gives:
clean -> de-duplicate -> sample -> split -> encode -> drop prompts that do not fit, rows in file order."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.helpers import FIXTURE_ROWS, write_jsonl
from titlegen.data import build as build_mod
from titlegen.data import shards
from titlegen.data.cache import SplitSettings, load_splits
from titlegen.data.encoding import Encoder, prompt_labels
from titlegen.data.prompts import PromptTemplate
from titlegen.data.records import clean_records, iter_rows, sample_records, split_of, title_hash
from titlegen.model.backbone import load_tokenizer


@pytest.fixture
def encoder(tiny_model_dir):
    return Encoder(load_tokenizer(str(tiny_model_dir)), PromptTemplate(template="Describe: {title} Answer:"), 48)


def _rows(n: int = 300) -> list[tuple[str, str]]:
    """Fixture rows many times over: duplicates, empty contents, titles in several splits' reach, long texts."""
    rows = [(f"{t} {i % 37}", c if i % 5 else c * 30) for i, (t, c) in enumerate(FIXTURE_ROWS * (n // 24 + 1))]
    return rows[:n] + rows[:20]  # exact duplicates at the end


def _reference(path, split: SplitSettings, encoder) -> dict[str, list]:
    stats: Counter = Counter()
    records = clean_records(iter_rows(path, stats), stats)
    if split.max_records is not None:
        records = sample_records(records, split.max_records, split.seed, stats)
    out: dict[str, list] = {"train": [], "val": [], "test": []}
    for rec in records:
        out[split_of(rec.title, split.seed, split.val_fraction, split.test_fraction)].append(rec)
    for name, recs in out.items():
        encoded = encoder.encode([r.title for r in recs], [r.content for r in recs])
        out[name] = [(r.title, r.content, e.input_ids, e.labels) for r, e in zip(recs, encoded) if e]
    return out


def _built(tmp_path, path, split, encoder) -> dict[str, list]:
    target = tmp_path / "cache" / "x"
    build_mod.build(path, split, encoder, target, str)
    splits = load_splits(target)
    return {name: [(t, c, ids, prompt_labels(ids, p)) for t, c, ids, p in zip(
        splits[name]["title"], splits[name]["content"], splits[name]["input_ids"], splits[name]["prompt_length"])]
        if name in splits else [] for name in ("train", "val", "test")}


@pytest.mark.parametrize("max_records", [None, 150])
def test_build_equals_the_plain_record_pipeline(tmp_path, encoder, max_records):
    path = write_jsonl(tmp_path / "trn.json", _rows())
    split = SplitSettings(max_records, 7, 0.2, 0.1, False)
    assert _built(tmp_path, path, split, encoder) == _reference(path, split, encoder)


def test_two_workers_build_what_one_builds(tmp_path, encoder, monkeypatch):
    path = write_jsonl(tmp_path / "trn.json", _rows(600))
    split = SplitSettings(None, 0, 0.2, 0.0, False)
    monkeypatch.setattr(shards, "CHUNK_LINES", 50)
    one = _built(tmp_path / "one", path, split, encoder)
    monkeypatch.setattr(build_mod, "PARALLEL_FROM_BYTES", 0)
    monkeypatch.setattr(build_mod.os, "cpu_count", lambda: 2)
    assert _built(tmp_path / "two", path, split, encoder) == one


def test_a_stopped_build_continues_from_its_shards(tmp_path, encoder, monkeypatch):
    path = write_jsonl(tmp_path / "trn.json", _rows())
    split = SplitSettings(None, 0, 0.2, 0.0, False)
    monkeypatch.setattr(shards, "CHUNK_LINES", 40)
    whole = _built(tmp_path / "whole", path, split, encoder)
    calls, died = [], []
    original = shards.write_shard

    def dies_on_the_fourth(job, index, rows, stats):
        calls.append(index)
        if len(calls) == 4 and not died:
            died.append(index)
            raise KeyboardInterrupt  # Ctrl-C in the middle of the build
        original(job, index, rows, stats)

    monkeypatch.setattr(shards, "write_shard", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        _built(tmp_path, path, split, encoder)
    assert not (tmp_path / "cache" / "x").exists()  # never a half-written cache
    calls.clear()
    assert _built(tmp_path, path, split, encoder) == whole
    assert 0 not in calls and len(calls) == -(-len(_rows()) // 40) - 3  # the 3 finished shards were kept


def test_validation_split_is_capped_by_title_hash(tmp_path, encoder):
    """The full file's 5% would be ~75,000 validation rows; the cap keeps the smallest title hashes, whole titles."""
    rows = [(f"Title {i % 40}", f"Description {i}") for i in range(200)]  # 40 titles, 5 rows each
    path = write_jsonl(tmp_path / "trn.json", rows)
    built = _built(tmp_path, path, SplitSettings(None, 0, 0.5, 0.0, False, max_val_rows=12), encoder)
    assert len(built["val"]) == 10 and len(built["train"]) == 190  # 2 whole titles: a third would pass 12
    val_titles, train_titles = ({r[0] for r in built[n]} for n in ("val", "train"))
    assert not val_titles & train_titles
    below = [title_hash(t, 0) for t in train_titles if title_hash(t, 0) < 0.5]  # val by fraction, moved by cap
    assert below and max(title_hash(t, 0) for t in val_titles) < min(below)
    stats = json.loads((tmp_path / "cache" / "x" / "stats.json").read_text())
    assert stats["val"] == 10 and stats["train"] == 190


def test_cache_key_survives_a_copy_to_another_machine(tmp_path, encoder):
    """prepare on one machine, fit on another: another path and modification time, the same key."""
    import os
    import shutil

    from titlegen.data.cache import cache_key

    path = write_jsonl(tmp_path / "trn.json", _rows())
    copy = tmp_path / "elsewhere" / "trn.json"
    copy.parent.mkdir()
    shutil.copyfile(path, copy)
    os.utime(copy, (1, 1))
    split = SplitSettings(None, 0, 0.2, 0.0, False)
    assert cache_key(copy, split, encoder) == cache_key(path, split, encoder)
    with copy.open("a") as fh:
        fh.write(json.dumps({"title": "One more", "content": "row"}) + "\n")
    assert cache_key(copy, split, encoder) != cache_key(path, split, encoder)
