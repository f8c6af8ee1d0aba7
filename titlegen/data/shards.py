"""One worker's share of the cache build: parse, clean and tokenize chunks of the input into Arrow shards.

Every worker reads the whole file (decompressing is cheap next to cleaning and tokenizing) and processes the
chunks ``index % workers == rank``; a finished chunk is a shard file, written through a temporary file and a
rename, so a build killed half-way continues from the shards it has. Nothing here decides duplicates, samples or
splits: the shards keep the numbers those decisions need (a 64-bit key, the title and sample hashes).
"""

from __future__ import annotations

import gc
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from titlegen.data.encoding import Encoder
from titlegen.data.files import file_format, numbered_lines
from titlegen.data.records import (
    BadLines,
    Record,
    clean_record,
    iter_rows,
    parse_json_line,
    record_key,
    sample_hash,
    title_hash,
    to_record,
)

CHUNK_LINES = 10_000  # a chunk's token lists stay ~150 MB in Python before they become Arrow arrays
SCHEMA = pa.schema([
    ("line", pa.int64()), ("title", pa.string()), ("content", pa.string()), ("uid", pa.string()),
    ("input_ids", pa.list_(pa.int32())), ("prompt_length", pa.int32()), ("length", pa.int32()),
    ("fits", pa.bool_()), ("key", pa.uint64()), ("title_u", pa.float64()), ("sample_u", pa.float64()),
])


@dataclass(frozen=True)
class Job:
    """What every worker needs to know (picklable: it travels to worker processes)."""

    path: Path
    work_dir: Path
    encoder: Encoder
    seed: int
    skip_bad_lines: bool
    workers: int


def shard_path(work_dir: Path, index: int) -> Path:
    return work_dir / f"shard-{index:06d}.arrow"


def _json_chunks(job: Job, rank: int, report: Callable[[int], object]) -> Iterator[tuple[int, list]]:
    """(chunk index, [(line number, raw bytes)]) of this worker's chunks that are not done yet."""
    done = {int(p.name[6:12]) for p in job.work_dir.glob("shard-*.arrow")}
    lines: list = []
    current, mine = -1, False
    for number, raw in numbered_lines(job.path, report):
        index = (number - 1) // CHUNK_LINES
        if index != current:
            if lines:
                yield current, lines
            lines, current = [], index
            mine = index % job.workers == rank and index not in done
        if mine:
            lines.append((number, raw))
    if lines:
        yield current, lines


def _records(job: Job, lines: list, stats: Counter) -> list[Record]:
    bad, out = BadLines(job.skip_bad_lines, stats), []
    for number, raw in lines:
        where = f"{job.path}:{number}"
        obj = parse_json_line(raw, where, bad)
        if obj is not None:
            stats["read"] += 1
            rec = to_record(obj, where, number, bad)
            if rec is not None:
                out.append(rec)
    return out


def write_shard(job: Job, index: int, raw_rows: list[Record], stats: Counter) -> None:
    """Clean and tokenize ``raw_rows`` into shard ``index``, with the chunk's counts in its metadata."""
    rows = []
    for row in raw_rows:
        rec, dropped = clean_record(row)
        if rec is None:
            stats[dropped] += 1
        else:
            rows.append(rec)
    encoded = job.encoder.encode([r.title for r in rows], [r.content for r in rows]) if rows else []
    columns = {
        "line": [r.line for r in rows], "title": [r.title for r in rows], "content": [r.content for r in rows],
        "uid": [r.uid for r in rows], "input_ids": [e.input_ids if e else [] for e in encoded],
        "prompt_length": [e.prompt_length if e else 0 for e in encoded], "length": [len(e.input_ids) if e else 0 for e in encoded],
        "fits": [e is not None for e in encoded], "key": [record_key(r) for r in rows],
        "title_u": [title_hash(r.title, job.seed) for r in rows], "sample_u": [sample_hash(r, job.seed) for r in rows],
    }
    table = pa.table(columns, schema=SCHEMA.with_metadata({"stats": json.dumps(stats)}))
    final = shard_path(job.work_dir, index)
    tmp = final.with_name(final.name + f".{os.getpid()}.tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, final)


def run_worker(job: Job, rank: int, report: Callable[[int], object] = lambda n: None) -> None:
    """Process this worker's chunks that have no shard yet."""
    if file_format(job.path) == "csv":  # quoted fields may span lines: one worker reads it in order
        _csv_worker(job, report)
        return
    # Python's cyclic collector would walk the growing heaps of token lists every few hundred allocations (7% of
    # the time here), and they hold no cycles: it runs once per chunk instead.
    for index, lines in _json_chunks(job, rank, report):
        stats: Counter = Counter()
        gc.disable()
        try:
            write_shard(job, index, _records(job, lines, stats), stats)
        finally:
            gc.enable()
        gc.collect()


def _csv_worker(job: Job, report: Callable[[int], object]) -> None:
    stats: Counter = Counter()
    rows: list[Record] = []
    for rec in iter_rows(job.path, stats, job.skip_bad_lines, report):
        rows.append(rec)
    write_shard(job, 0, rows, stats)
