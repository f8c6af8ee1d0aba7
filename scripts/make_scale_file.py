"""Write a synthetic LF-Amazon-1.3M ``trn.json.gz`` of the real size and shape, to measure preparation at scale.

2,248,619 JSON lines with ``uid``, ``title``, ``content``, ``target_ind`` and ``target_rel``, about a third with an
empty ``content``, made from the real rows in ``../shared/data`` (raw text: entities, edition notes, newlines)
with titles made unique, so nothing is dropped as a duplicate that the real file would keep.

  python scripts/make_scale_file.py --out /tmp/scale/trn.json.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import sys
import tempfile
from pathlib import Path

REAL_LINES = 2_248_619
DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data"


def real_rows(source: Path) -> list[dict]:
    rows = []
    for name in ("amazon_titles_dev.jsonl", "amazon_titles_extra_normalized.jsonl"):  # never the eval rows
        with (source / name).open(encoding="utf-8") as fh:
            rows += [json.loads(line) for line in fh if line.strip()]
    return [r for r in rows if r.get("content")]


def lines(rows: list[dict], count: int, seed: int):
    rng = random.Random(seed)
    for i in range(count):
        row = rows[i % len(rows)]
        empty = rng.random() < 1 / 3  # the real file: about a third without a description
        targets = rng.sample(range(1_300_000), k=rng.randint(1, 8))
        yield json.dumps({"uid": f"S{i:08d}", "title": f"{row['title']} (vol. {i})",
                          "content": "" if empty else row["content"], "target_ind": targets,
                          "target_rel": [1.0] * len(targets)}, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="the .json.gz to write")
    ap.add_argument("--lines", type=int, default=REAL_LINES)
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder of real rows (shared/data)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    if args.out.exists() and not args.overwrite:
        print(f"make_scale_file: error: {args.out} exists (pass --overwrite to replace it)", file=sys.stderr)
        return 2
    if not (args.source / "amazon_titles_dev.jsonl").is_file():
        print(f"make_scale_file: error: {args.source}: no real rows here (expected shared/data)", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6) as gz:
            for line in lines(real_rows(args.source), args.lines, args.seed):
                gz.write(line.encode("utf-8"))
        os.chmod(tmp, 0o644)
        os.replace(tmp, args.out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"wrote {args.out} ({args.lines} lines, {args.out.stat().st_size / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
