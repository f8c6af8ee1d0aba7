"""The processed splits, built once (:mod:`titlegen.data.build`) and kept as Arrow files keyed by everything they
depend on, so a second run with the same file and settings maps them in seconds instead of redoing the work."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from titlegen.data.build import SPLITS, build
from titlegen.data.encoding import Encoder

log = logging.getLogger("titlegen")
CACHE_VERSION = 3  # bump when cleaning, encoding or the file layout changes


@dataclass(frozen=True)
class SplitSettings:
    """What decides which records exist and where they land."""

    max_records: int | None
    seed: int
    val_fraction: float
    test_fraction: float
    skip_bad_lines: bool
    max_val_rows: int | None = None


def file_fingerprint(path: Path) -> list:
    """Name, size and a hash of the first and last MiB: the same on any machine the file is copied to (paths and
    modification times are not), so a cache built by ``prepare`` elsewhere is found by ``fit`` here."""
    size, digest = path.stat().st_size, hashlib.sha1()
    with path.open("rb") as fh:
        digest.update(fh.read(2**20))
        fh.seek(max(0, size - 2**20))
        digest.update(fh.read(2**20))
    return [path.name, size, digest.hexdigest()]


def cache_key(path: Path, split: SplitSettings, encoder: Encoder) -> str:
    """Hash of the file's identity, the split settings, the prompt, max_length and the tokenizer's behaviour."""
    tok = encoder.tokenizer
    parts = {
        "version": CACHE_VERSION,
        "file": file_fingerprint(path),
        "split": asdict(split),
        "prompt": asdict(encoder.prompt),
        "max_length": encoder.max_length,
        "tokenizer": [len(tok), encoder.eos_id, tok("Tokenizer probe: 12-Pack café ™ <|im_end|>")["input_ids"]],
    }
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def load_or_build(path: Path, split: SplitSettings, encoder: Encoder, cache_dir: Path) -> Path:
    """The cache directory for these settings, building it first if it does not exist yet."""
    target = cache_dir / f"{path.name.split('.')[0]}-{cache_key(path, split, encoder)}"
    if not (target / "stats.json").is_file():
        with _build_lock(target):  # another process may be building it right now: wait, then use its result
            if not (target / "stats.json").is_file():
                log.info("data: cleaning and tokenizing %s (once; cached in %s)", path, target)
                stats = build(path, split, encoder, target, _summary)
                log.info("data: %s", _summary(stats))
                return target
    stats = Counter(json.loads((target / "stats.json").read_text()))
    log.info("data: using cached splits %s (%s)", target, _summary(stats))
    return target


@contextlib.contextmanager
def _build_lock(target: Path):
    """One builder per cache at a time, across processes: several nodes' first processes preparing the data on a
    shared file system, or two runs started together. The lock file stays (removing it would race)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f".{target.name}.lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("data: another process is building %s; waiting for it", target)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _summary(stats: Counter) -> str:
    dropped = ", ".join(f"{k.removeprefix('dropped_').replace('_', ' ')} {v}"
                        for k, v in sorted(stats.items()) if k.startswith("dropped_") and v)
    skipped = f", skipped bad lines {stats['skipped_bad_line']}" if stats["skipped_bad_line"] else ""
    return (f"read {stats['read']} rows{skipped}; dropped: {dropped or 'none'}; "
            f"train {stats['train']}, val {stats['val']}, test {stats['test']}")


def load_splits(target: Path) -> dict:
    """The cached splits as ``datasets.Dataset`` objects, memory-mapped (nothing is read into memory)."""
    import datasets

    return {name: datasets.Dataset.from_file(str(target / f"{name}.arrow"))
            for name in SPLITS if (target / f"{name}.arrow").is_file()}
