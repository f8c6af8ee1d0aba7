"""Writes that never leave a half-written file or directory behind: build beside the target, then rename.

A reader (or a crashed run's successor) sees the old file or directory or the whole new one, never a mix.
Files come out with the permissions of any file the user creates (``tempfile`` would make them private).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from titlegen.errors import TitlegenError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[IO[str]], object]) -> None:
    """Call ``write(file)`` on a text file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text))


@contextlib.contextmanager
def staged_dir(target: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty directory to fill; when the block succeeds it takes ``target``'s place.

    An existing ``target`` is replaced only with ``replace`` (titlegen's own outputs: a cache, a run's adapter);
    otherwise a non-empty one is refused, so a user's directory is never deleted. The old directory is moved
    aside before the new one is renamed in, and removed only after.
    """
    target = Path(target)
    if target.exists() and not replace and (target.is_file() or any(target.iterdir())):
        raise TitlegenError(f"{target}: already exists and is not empty (choose another path, or --overwrite)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        staged = Path(tmp) / "new"
        staged.mkdir()
        yield staged
        if target.exists():
            os.replace(target, Path(tmp) / "old")
        os.replace(staged, target)
    # the old directory, if any, went with the temporary one


def copy_if_present(src: Path, dst_dir: Path) -> None:
    if src.is_file():
        shutil.copy(src, dst_dir / src.name)
