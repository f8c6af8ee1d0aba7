"""Torch-free record layer: stream rows from JSON Lines (optionally gzipped) or CSV, clean, filter, de-duplicate,
sample and split. Files are read line by line, never whole into memory (trn.json has 2.25M lines).

Every problem with an input file raises :class:`TitlegenError` naming the file and line.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import io
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from titlegen.data.cleaning import clean_text, same_text
from titlegen.data.files import GZIP_ERRORS, check_readable, file_format, gzip_error, numbered_lines, open_binary
from titlegen.errors import TitlegenError

log = logging.getLogger("titlegen")


@dataclass(frozen=True)
class Record:
    """One cleaned (title, content) pair and where it came from."""

    title: str
    content: str
    uid: str = ""
    line: int = 0


class BadLines:
    """Raises on the first bad line, or, when skipping is allowed, counts it and logs the first few."""

    def __init__(self, skip: bool, stats: Counter) -> None:
        self.skip, self.stats = skip, stats

    def report(self, where: str, problem: str) -> None:
        if not self.skip:
            raise TitlegenError(f"{where}: {problem}")
        self.stats["skipped_bad_line"] += 1
        if self.stats["skipped_bad_line"] <= 3:
            log.warning("skipped bad line %s: %s", where, problem)


def parse_json_line(raw: bytes, where: str, bad: BadLines) -> dict | None:
    """One JSON Lines line as an object; None for a blank or (when skipping) a bad line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        bad.report(where, f"not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1})")
        return None
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        bad.report(where, f"not valid JSON ({err.msg} at column {err.colno}); expected one object per line")
        return None
    if not isinstance(obj, dict):
        bad.report(where, f"expected a JSON object with 'title' and 'content', got {type(obj).__name__}")
        return None
    return obj


def iter_json_lines(path: Path, bad: BadLines, progress=None) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line of a JSON Lines file."""
    for number, raw in numbered_lines(path, progress):
        obj = parse_json_line(raw, f"{path}:{number}", bad)
        if obj is not None:
            yield number, obj


def iter_csv_lists(path: Path, bad: BadLines, required: tuple[str, ...],
                   progress=None) -> Iterator[tuple[int, list[str], list[str]]]:
    """Yield (line number, header, fields) for each CSV row, fields padded to the header's width. The header
    must name every ``required`` column exactly once; any other column may repeat (it is kept, not merged)."""
    with open_binary(path, progress) as raw:
        reader = csv.reader(io.TextIOWrapper(raw, encoding="utf-8-sig", newline=""))
        try:
            header = next(reader, [])
            _check_header(path, header, required)
            for fields in reader:
                if not fields:
                    continue
                if len(fields) > len(header):
                    bad.report(f"{path}:{reader.line_num}", f"{len(fields)} fields, header has {len(header)}")
                    continue
                yield reader.line_num, header, fields + [""] * (len(header) - len(fields))
        except UnicodeDecodeError as err:
            raise TitlegenError(f"{path}:{reader.line_num + 1}: not UTF-8 text ({err.reason})") from None
        except csv.Error as err:
            raise TitlegenError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None
        except GZIP_ERRORS as err:
            raise gzip_error(path, reader.line_num + 1, err) from None


def _check_header(path: Path, header: list[str], required: tuple[str, ...]) -> None:
    missing = [c for c in required if c not in header]
    if missing:
        raise TitlegenError(f"{path}:1: CSV header lacks column(s) {', '.join(map(repr, missing))} "
                            f"(found {', '.join(map(repr, header)) or 'no header'})")
    twice = [c for c in required if header.count(c) > 1]
    if twice:
        raise TitlegenError(f"{path}:1: CSV header names {', '.join(map(repr, twice))} more than once")


def iter_csv_rows(path: Path, bad: BadLines, required: tuple[str, ...], progress=None) -> Iterator[tuple[int, dict]]:
    """Yield (line number, row dict) for each CSV row; the header must name every ``required`` column."""
    for number, header, fields in iter_csv_lists(path, bad, required, progress):
        yield number, dict(zip(header, fields))


def _text_field(obj: dict, key: str, where: str, bad: BadLines) -> str | None:
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value or ""
    bad.report(where, f"field '{key}' should be a string, got {type(value).__name__}")
    return None


def iter_rows(path: str | Path, stats: Counter, skip_bad_lines: bool = False,
              progress: Callable[[int], object] | None = None) -> Iterator[Record]:
    """Stream raw (uncleaned) title/content rows from a JSON Lines, .json.gz or CSV file; ``progress`` is called
    with the number of bytes of the file read since its last call."""
    path = check_readable(path)
    bad = BadLines(skip_bad_lines, stats)
    kind = file_format(path)
    rows = (iter_json_lines(path, bad, progress) if kind == "jsonl"
            else iter_csv_rows(path, bad, ("title", "content"), progress))
    for number, obj in rows:
        stats["read"] += 1
        record = to_record(obj, f"{path}:{number}", number, bad)
        if record is not None:
            yield record


def to_record(obj: dict, where: str, line: int, bad: BadLines) -> Record | None:
    """The raw (uncleaned) title and content of a parsed row; None when a field is not text (skipping)."""
    title = _text_field(obj, "title", where, bad)
    content = _text_field(obj, "content", where, bad)
    if title is None or content is None:
        return None
    return Record(title=title, content=content, uid=str(obj.get("uid") or ""), line=line)


def clean_record(row: Record) -> tuple[Record | None, str]:
    """The cleaned row, or None and the stats key of why it is dropped (duplicates are decided elsewhere)."""
    title, content = clean_text(row.title), clean_text(row.content)
    if not title:
        return None, "dropped_empty_title"
    if not content:
        return None, "dropped_empty_content"
    if same_text(title, content):
        return None, "dropped_title_equals_content"
    return Record(title=title, content=content, uid=row.uid, line=row.line), ""


def record_key(rec: Record) -> int:
    """64 bits that identify a (title, content) pair, for de-duplication."""
    return int.from_bytes(hashlib.blake2b(f"{rec.title}\0{rec.content}".encode(), digest_size=8).digest(), "big")


def sample_hash(rec: Record, seed: int) -> float:
    """The number that decides whether a record is in a ``max_records`` sample (the smallest ones are)."""
    return seeded_hash(f"{rec.title}\0{rec.content}", seed)


def clean_records(rows: Iterable[Record], stats: Counter) -> Iterator[Record]:
    """Clean each row; drop empty titles/contents, contents that only repeat the title, and exact duplicates."""
    seen: set[int] = set()
    for row in rows:
        rec, dropped = clean_record(row)
        if rec is None:
            stats[dropped] += 1
            continue
        key = record_key(rec)
        if key in seen:
            stats["dropped_duplicate"] += 1
            continue
        seen.add(key)
        yield rec


def seeded_hash(text: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, text): reproducible on any machine, any order of rows."""
    digest = hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def sample_records(records: Iterable[Record], k: int, seed: int, stats: Counter) -> list[Record]:
    """Keep the ``k`` records with the smallest seeded hash (a uniform sample, not the first k), in file order."""
    heap: list[tuple[float, int, Record]] = []  # max-heap on the hash via negation
    for i, rec in enumerate(records):
        item = (-sample_hash(rec, seed), i, rec)
        if len(heap) < k:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)
            stats["dropped_by_max_records"] += 1
        else:
            stats["dropped_by_max_records"] += 1
    return [rec for _, _, rec in sorted(heap, key=lambda t: t[1])]


def title_hash(title: str, seed: int) -> float:
    """The number that places a title in a split (case-insensitive)."""
    return seeded_hash(title.casefold(), seed)


def split_of(title: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """``train``/``val``/``test`` from a seeded hash of the title, so one title never lands in two splits."""
    u = title_hash(title, seed)
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"
