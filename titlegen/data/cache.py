"""Build the processed splits once and keep them as Arrow files (``datasets``), keyed by everything they depend
on, so a second run with the same file and settings loads them in seconds instead of redoing the work."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from titlegen.data.encoding import Encoder
from titlegen.data.records import clean_records, iter_rows, sample_records, split_of, title_hash
from titlegen.errors import TitlegenError
from titlegen.io import staged_dir

log = logging.getLogger("titlegen")
CACHE_VERSION = 1  # bump when cleaning or encoding changes meaning
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitSettings:
    """What decides which records exist and where they land."""

    max_records: int | None
    seed: int
    val_fraction: float
    test_fraction: float
    skip_bad_lines: bool
    max_val_rows: int | None = None


def cache_key(path: Path, split: SplitSettings, encoder: Encoder) -> str:
    """Hash of the file's identity, the split settings, the prompt, max_length and the tokenizer."""
    stat = path.stat()
    tok = encoder.tokenizer
    parts = {
        "version": CACHE_VERSION,
        "file": [str(path.resolve()), stat.st_size, stat.st_mtime_ns],
        "split": asdict(split),
        "prompt": asdict(encoder.prompt),
        "max_length": encoder.max_length,
        "tokenizer": [tok.name_or_path, len(tok), encoder.eos_id, tok("Tokenizer probe: 12-Pack café ™")["input_ids"]],
    }
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _write_split_files(path: Path, split: SplitSettings, workdir: Path, stats: Counter) -> None:
    """Stream, clean and split into train/val/test JSON Lines files (one pass, constant memory)."""
    bar = tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"reading {path.name}", disable=None,
               mininterval=1.0, leave=False)  # disable=None: only on a terminal
    records = clean_records(iter_rows(path, stats, split.skip_bad_lines, progress=bar.update), stats)
    if split.max_records is not None:
        records = sample_records(records, split.max_records, split.seed, stats)
    files = {name: (workdir / f"{name}.jsonl").open("w", encoding="utf-8") for name in SPLITS}
    try:
        for rec in records:
            name = split_of(rec.title, split.seed, split.val_fraction, split.test_fraction)
            files[name].write(json.dumps({"title": rec.title, "content": rec.content, "uid": rec.uid}) + "\n")
            stats[name] += 1
    finally:
        bar.close()
        for fh in files.values():
            fh.close()
    if split.max_val_rows is not None and stats["val"] > split.max_val_rows:
        _cap_val(workdir, split, stats)


def _cap_val(workdir: Path, split: SplitSettings, stats: Counter) -> None:
    """Keep the ``max_val_rows`` validation rows of smallest title hash (whole titles: a title never lands in two
    splits); the rest train. A 5% split of the full file would be ~75,000 rows per validation."""
    val = workdir / "val.jsonl"
    with val.open(encoding="utf-8") as fh:
        hashes = sorted(title_hash(json.loads(line)["title"], split.seed) for line in fh)
    bound = hashes[split.max_val_rows]  # the first row left out; its whole title goes with it
    kept = workdir / "val.kept.jsonl"
    with val.open(encoding="utf-8") as src, kept.open("w", encoding="utf-8") as keep, \
            (workdir / "train.jsonl").open("a", encoding="utf-8") as train:
        for line in src:
            (keep if title_hash(json.loads(line)["title"], split.seed) < bound else train).write(line)
    moved = sum(1 for u in hashes if u >= bound)
    stats["val"] -= moved
    stats["train"] += moved
    os.replace(kept, val)


def _tokenize(batch: dict, encoder: Encoder) -> dict:
    encoded = encoder.encode(batch["title"], batch["content"])
    keep = [e is not None for e in encoded]
    return {
        "input_ids": [e.input_ids if e else [] for e in encoded],
        "labels": [e.labels if e else [] for e in encoded],
        "length": [len(e.input_ids) if e else 0 for e in encoded],
        "keep": keep,
    }


def build(path: Path, split: SplitSettings, encoder: Encoder, target: Path) -> Counter:
    """Clean, split and tokenize ``path`` into ``target`` (a DatasetDict on disk), atomically."""
    import datasets

    stats: Counter = Counter()
    with staged_dir(target, replace=True) as staged, tempfile.TemporaryDirectory(dir=staged.parent) as tmp:
        work = Path(tmp)
        _write_split_files(path, split, work, stats)
        if stats["train"] == 0:
            raise TitlegenError(f"{path}: no usable rows for training after cleaning ({_summary(stats)})")
        files = {name: str(work / f"{name}.jsonl") for name in SPLITS if stats[name]}
        features = datasets.Features({k: datasets.Value("string") for k in ("title", "content", "uid")})
        raw = datasets.load_dataset("json", data_files=files, features=features, cache_dir=str(work / "hf"))
        nproc = min(os.cpu_count() or 1, 8) if stats["read"] > 50_000 else None
        if nproc:  # minutes of work ahead: show datasets' bars (rate, ETA); small files stay quiet
            datasets.enable_progress_bars()
        tokenized = raw.map(_tokenize, batched=True, fn_kwargs={"encoder": encoder}, num_proc=nproc,
                            desc="tokenizing")
        for name, ds in tokenized.items():
            stats["dropped_prompt_too_long"] += len(ds) - sum(ds["keep"])
        tokenized = tokenized.filter(lambda k: k, input_columns="keep").remove_columns("keep")
        if len(tokenized["train"]) == 0:  # training would end at once with "no training batches" and exit 0
            raise TitlegenError(f"{path}: no training example fits data.max_length {encoder.max_length}: every "
                                "prompt alone is that long; raise data.max_length or shorten data.prompt.template")
        tokenized.save_to_disk(str(staged))
        (staged / "stats.json").write_text(json.dumps(dict(stats), indent=1))
    return stats


def load_or_build(path: Path, split: SplitSettings, encoder: Encoder, cache_dir: Path) -> Path:
    """The cache directory for these settings, building it first if it does not exist yet."""
    target = cache_dir / f"{path.name.split('.')[0]}-{cache_key(path, split, encoder)}"
    if (target / "stats.json").is_file():
        stats = Counter(json.loads((target / "stats.json").read_text()))
        log.info("data: using cached splits %s (%s)", target, _summary(stats))
        return target
    log.info("data: cleaning and tokenizing %s (once; cached in %s)", path, target)
    stats = build(path, split, encoder, target)
    log.info("data: %s", _summary(stats))
    return target


def _summary(stats: Counter) -> str:
    dropped = ", ".join(f"{k.removeprefix('dropped_').replace('_', ' ')} {v}"
                        for k, v in sorted(stats.items()) if k.startswith("dropped_") and v)
    skipped = f", skipped bad lines {stats['skipped_bad_line']}" if stats["skipped_bad_line"] else ""
    return (f"read {stats['read']} rows{skipped}; dropped: {dropped or 'none'}; "
            f"train {stats['train']}, val {stats['val']}, test {stats['test']}")
