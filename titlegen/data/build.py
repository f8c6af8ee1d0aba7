"""Build the processed splits at the full file's size: parallel, resumable, in bounded memory.

1. Workers turn chunks of the input into Arrow shards (:mod:`titlegen.data.shards`) in ``<target>.work/``,
   which survives a crash: the same command again skips the finished shards.
2. From the shards' small columns alone (a 64-bit key, the title and sample hashes, a fits flag) the rows are
   chosen in one vectorized pass: first occurrence of each (title, content), the ``max_records`` sample, the
   split by title hash, the validation cap.
3. Each split is written as one Arrow file, rows in file order, into a staged directory renamed into place.
"""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing
import os
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from titlegen.data.shards import Job, run_worker
from titlegen.errors import TitlegenError
from titlegen.io import staged_dir

log = logging.getLogger("titlegen")
SPLITS = ("train", "val", "test")
KEPT = ["title", "content", "uid", "input_ids", "prompt_length", "length"]
PARALLEL_FROM_BYTES = 20 * 2**20  # below this one process does it all (no start-up cost)

_queue = None  # worker processes report bytes read through it (set by the pool's initializer)


def _init_worker(queue) -> None:
    global _queue
    _queue = queue
    # The parent decides when to stop (Ctrl-C, SIGTERM): it terminates the pool, which ends a worker quietly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _pool_worker(job: Job, rank: int) -> None:
    pending = [0]

    def report(n: int) -> None:  # a message per 8 MiB, not per 8 KiB read: the parent stays idle
        pending[0] += n
        if pending[0] >= 8 * 2**20:
            _queue.put(pending[0])
            pending[0] = 0

    gc.freeze()  # the tokenizer and the modules, inherited from the parent: never walked by the collector again
    run_worker(job, rank, report)


def make_shards(job: Job) -> None:
    """Run the workers, with a progress bar over the bytes of the input each has read (rate and ETA)."""
    total = job.path.stat().st_size * job.workers
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"preparing {job.path.name}", disable=None,
              mininterval=1.0, leave=False) as bar:
        if job.workers == 1:
            run_worker(job, 0, bar.update)
            return
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        queue = ctx.Queue()
        # Pool, not an executor: leaving the block (an error, Ctrl-C, SIGTERM) terminates the workers at once;
        # the shards they finished stay for the next run.
        with ctx.Pool(job.workers, initializer=_init_worker, initargs=(queue,)) as pool:
            results = [pool.apply_async(_pool_worker, (job, rank)) for rank in range(job.workers)]
            while not all(r.ready() for r in results):
                time.sleep(0.5)
                while not queue.empty():
                    bar.update(queue.get())
            for result in results:
                result.get()  # a worker's TitlegenError (file:line) surfaces here


def _shards(work_dir: Path) -> list[Path]:
    return sorted(work_dir.glob("shard-*.arrow"))


def _read(path: Path, columns: list[str] | None = None) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all().select(columns) if columns else pa.ipc.open_file(source).read_all()


def choose_rows(shards: list[Path], split, stats: Counter) -> dict[str, np.ndarray]:
    """Boolean row masks over all shards (in order) for each split, and the counts of every decision."""
    small = pa.concat_tables([_read(s, ["key", "title_u", "sample_u", "fits"]) for s in shards])
    for s in shards:
        with pa.memory_map(str(s)) as source:
            stats.update(json.loads(pa.ipc.open_file(source).schema.metadata[b"stats"]))
    key, title_u = small["key"].to_numpy(), small["title_u"].to_numpy()
    chosen = np.zeros(len(key), dtype=bool)
    chosen[np.unique(key, return_index=True)[1]] = True  # first occurrence in file order
    stats["dropped_duplicate"] += int(len(key) - chosen.sum())
    if split.max_records is not None and chosen.sum() > split.max_records:
        sample_u = small["sample_u"].to_numpy()
        limit = np.partition(sample_u[chosen], split.max_records - 1)[split.max_records - 1]
        stats["dropped_by_max_records"] += int(chosen.sum() - split.max_records)
        chosen &= sample_u <= limit
    # The vectorized form of records.split_of (tests/data/test_build.py checks that they agree).
    val = chosen & (title_u < split.val_fraction)
    test = chosen & ~val & (title_u < split.val_fraction + split.test_fraction)
    if split.max_val_rows is not None and val.sum() > split.max_val_rows:
        bound = np.sort(title_u[val])[split.max_val_rows]  # the first title left out goes whole
        val &= title_u < bound
    masks = {"val": val, "test": test, "train": chosen & ~val & ~test}
    fits = np.asarray(small["fits"].to_numpy(), dtype=bool)
    for name, mask in masks.items():
        stats[name] += int(mask.sum())
        stats["dropped_prompt_too_long"] += int((mask & ~fits).sum())
        masks[name] = mask & fits
    return masks


def write_splits(shards: list[Path], masks: dict[str, np.ndarray], target: Path) -> None:
    """One Arrow stream file per non-empty split (what ``datasets.Dataset.from_file`` maps), rows in file order."""
    writers, start = {}, 0
    try:
        for shard in shards:
            table = _read(shard, KEPT)
            for name, mask in masks.items():
                part = table.filter(pa.array(mask[start:start + len(table)]))
                if len(part):
                    if name not in writers:
                        writers[name] = pa.ipc.new_stream(str(target / f"{name}.arrow"), part.schema)
                    writers[name].write_table(part)
            start += len(table)
    finally:
        for writer in writers.values():
            writer.close()


def build(path: Path, split, encoder, target: Path, summary) -> Counter:
    """Clean, split and tokenize ``path`` into ``target``, continuing from ``<target>.work`` if a build stopped."""
    work_dir = target.with_name(target.name + ".work")
    work_dir.mkdir(parents=True, exist_ok=True)
    for stale in work_dir.glob("*.tmp"):  # a shard being written when the last build was killed
        stale.unlink()
    workers = min(os.cpu_count() or 1, 8) if path.stat().st_size >= PARALLEL_FROM_BYTES else 1
    start = time.monotonic()
    make_shards(Job(path, work_dir, encoder, split.seed, split.skip_bad_lines, workers))
    log.info("data: cleaned and tokenized in %.0f s (%d processes)", time.monotonic() - start, workers)
    stats: Counter = Counter()
    shards = _shards(work_dir)
    start = time.monotonic()
    masks = choose_rows(shards, split, stats)
    if stats["train"] == 0:
        raise TitlegenError(f"{path}: no usable rows for training after cleaning ({summary(stats)})")
    if not masks["train"].any():  # training would end at once with "no training batches" and exit 0
        raise TitlegenError(f"{path}: no training example fits data.max_length {encoder.max_length}: every "
                            "prompt alone is that long; raise data.max_length or shorten data.prompt.template")
    with staged_dir(target, replace=True) as staged:
        write_splits(shards, masks, staged)
        (staged / "stats.json").write_text(json.dumps(dict(stats), indent=1))
    log.info("data: splits chosen and written in %.0f s", time.monotonic() - start)
    shutil.rmtree(work_dir, ignore_errors=True)
    return stats
