import gzip
import json
from collections import Counter

import pytest

from tests.helpers import FIXTURE_ROWS, write_jsonl
from titlegen.data.records import clean_records, iter_rows, sample_records, split_of
from titlegen.errors import TitlegenError


def _clean(path, **kw):
    stats = Counter()
    return list(clean_records(iter_rows(path, stats, **kw), stats)), stats


def test_filters_and_counts_what_it_drops(fixture_file):
    records, stats = _clean(fixture_file)
    assert stats["read"] == len(FIXTURE_ROWS)
    assert stats["dropped_empty_content"] == 1
    assert stats["dropped_title_equals_content"] == 1
    assert stats["dropped_duplicate"] == 1
    assert len(records) == len(FIXTURE_ROWS) - 3
    by_title = {r.title: r.content for r in records}
    assert by_title["AT&T Cordless Phone"].startswith("DECT 6.0")
    assert by_title["The River at Night: A Novel"] == "A gripping story of four friends."
    assert by_title["Garden Hose 50 ft"] == "Kink-resistant hose’s brass fittings last for years."
    assert records[0].line == 1 and records[0].uid == "T0000"


def test_gzip_and_csv_read_like_jsonl(tmp_path, fixture_file):
    gz = tmp_path / "trn.json.gz"
    gz.write_bytes(gzip.compress(fixture_file.read_bytes()))
    csv_path = tmp_path / "rows.csv"
    import csv

    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["title", "content", "extra"])
        writer.writerows((t, c, "x") for t, c in FIXTURE_ROWS)
    base = [(r.title, r.content) for r in _clean(fixture_file)[0]]
    assert [(r.title, r.content) for r in _clean(gz)[0]] == base
    assert [(r.title, r.content) for r in _clean(csv_path)[0]] == base


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("missing.json", None, "missing.json: file not found"),
        ("empty.json", b"", "empty.json: empty file"),
        ("bad.json", b'{"title": "a", "content": "b"}\n{"title": oops}\n', "bad.json:2: not valid JSON"),
        ("latin1.json", '{"title": "caf\u00e9", "content": "x"}\n'.encode("latin-1"), "latin1.json:1: not UTF-8"),
        ("list.json", b'["title", "content"]\n', "list.json:1: expected a JSON object"),
        ("num.json", b'{"title": 5, "content": "b"}\n', "num.json:1: field 'title' should be a string"),
        ("notitle.csv", b"name,content\nx,y\n", "notitle.csv:1: CSV header lacks column(s) 'title'"),
        ("data.txt", b"hello\n", "data.txt: unknown file type"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, name, data, message):
    path = tmp_path / name
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(TitlegenError) as err:
        _clean(path)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_skip_bad_lines_counts_and_keeps_going(tmp_path):
    path = tmp_path / "mixed.json"
    path.write_bytes(b'{"title": "a", "content": "b"}\n{broken\n\xff\xfe\n{"title": "c", "content": "d"}\n')
    records, stats = _clean(path, skip_bad_lines=True)
    assert [r.title for r in records] == ["a", "c"]
    assert stats["skipped_bad_line"] == 2


def test_split_is_by_title_and_reproducible():
    titles = [f"Product {i}" for i in range(2000)]
    splits = [split_of(t, 7, 0.1, 0.1) for t in titles]
    assert splits == [split_of(t, 7, 0.1, 0.1) for t in titles]
    assert split_of("Wool Socks", 7, 0.1, 0.1) == split_of("WOOL SOCKS", 7, 0.1, 0.1)
    counts = Counter(splits)
    assert 150 < counts["val"] < 250 and 150 < counts["test"] < 250
    assert [split_of(t, 8, 0.1, 0.1) for t in titles] != splits  # the seed matters


def test_same_title_never_in_two_splits(fixture_file):
    records, _ = _clean(fixture_file)
    for seed in range(20):
        where = {}
        for r in records:
            where.setdefault(r.title, set()).add(split_of(r.title, seed, 0.3, 0.3))
        assert all(len(s) == 1 for s in where.values())


def test_sample_is_seeded_uniform_not_first_n(tmp_path):
    rows = [(f"Item number {i}", f"Description of item {i}.") for i in range(500)]
    path = write_jsonl(tmp_path / "many.json", rows)
    records, _ = _clean(path)
    stats = Counter()
    a = sample_records(records, 50, seed=1, stats=stats)
    assert len(a) == 50 and stats["dropped_by_max_records"] == 450
    assert [r.title for r in a] == [r.title for r in sample_records(records, 50, 1, Counter())]
    assert [r.title for r in a] != [r.title for r in records[:50]]
    assert [r.line for r in a] == sorted(r.line for r in a)  # file order kept
    assert max(r.line for r in a) > 400  # drawn from the whole file
    assert {r.title for r in a} != {r.title for r in sample_records(records, 50, 2, Counter())}


def test_real_rows_stream_clean_and_split(shared_data):
    records, stats = _clean(shared_data / "amazon_titles_train.jsonl")
    assert stats["read"] == 726 and stats["dropped_empty_content"] == 7
    assert len(records) > 700
    titles = {r.title for r in records}
    eval_titles = {json.loads(line)["title"] for line in (shared_data / "amazon_titles_eval.jsonl").open()}
    assert not titles & eval_titles  # the eval rows are really held out
