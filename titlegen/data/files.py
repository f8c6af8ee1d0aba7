"""Opening input files: existence checks, the format by name, transparent gzip with one-line errors for a broken
download, and a byte count for progress bars."""

from __future__ import annotations

import contextlib
import gzip
import io
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from titlegen.errors import TitlegenError

JSON_SUFFIXES = {".json", ".jsonl", ".ndjson"}


def check_readable(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise TitlegenError(f"{path}: file not found")
    if not path.is_file():
        raise TitlegenError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise TitlegenError(f"{path}: empty file (expected rows with 'title' and 'content')")
    return path


def file_format(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    suffix = Path(name).suffix
    if suffix in JSON_SUFFIXES:
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    raise TitlegenError(f"{path}: unknown file type (expected .json/.jsonl JSON Lines, .json.gz or .csv)")


class _CountingReader(io.RawIOBase):
    """A raw file that reports how many bytes of the file on disk were read (a progress bar's position)."""

    def __init__(self, path: Path, progress: Callable[[int], object]) -> None:
        self._file, self._progress = path.open("rb", buffering=0), progress

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._file.readinto(buffer)
        self._progress(n or 0)
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


@contextlib.contextmanager
def open_binary(path: Path, progress: Callable[[int], object] | None = None) -> Iterator[IO[bytes]]:
    """The file's bytes, decompressed when it ends in .gz; ``progress`` counts bytes read from disk."""
    with io.BufferedReader(_CountingReader(path, progress)) if progress else path.open("rb") as raw:
        if path.suffix.lower() != ".gz":
            yield raw
            return
        with gzip.GzipFile(fileobj=raw, mode="rb") as unpacked:
            yield unpacked


def gzip_error(path: Path, line: int, err: Exception) -> TitlegenError:
    """One line for a broken compressed file, instead of a traceback from deep inside gzip."""
    if isinstance(err, EOFError):
        return TitlegenError(f"{path}:{line}: the gzip data ends early (an interrupted download?); "
                             "expected a complete .gz file")
    return TitlegenError(f"{path}: not readable as gzip ({err}); expected a file written by gzip")


GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


def numbered_lines(path: Path, progress=None) -> Iterator[tuple[int, bytes]]:
    number = 0
    try:
        with open_binary(path, progress) as fh:
            for number, raw in enumerate(fh, start=1):
                yield number, raw
    except GZIP_ERRORS as err:
        raise gzip_error(path, number + 1, err) from None
