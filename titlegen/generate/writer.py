"""Predict output: results are appended to a journal as they are produced, so a crashed or interrupted run
continues where it stopped; the finished CSV (all input columns + ``description``, input order) appears at once
through a temporary file and a rename, never half-written.

On several devices each rank takes its share of the batches and keeps its own journal
(``<output>.partial.rank<R>.jsonl``); every rank reads all journals at the start (so a run resumes whatever the
number of devices before), and rank 0 merges them into the one CSV at the end.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from titlegen.errors import TitlegenError
from titlegen.io import atomic_write

log = logging.getLogger("titlegen")


def journal_path(output: Path, rank: int = 0, world: int = 1) -> Path:
    return output.with_name(output.name + (".partial.jsonl" if world == 1 else f".partial.rank{rank}.jsonl"))


def journals(output: Path) -> list[Path]:
    """Every journal of ``output``, from a run on any number of devices."""
    return sorted(output.parent.glob(output.name + ".partial*.jsonl"))


class CSVPredictionWriter(BasePredictionWriter):
    """Writes a description for every input row to ``output`` (CSV), resumable through a journal file.

    Args:
        output: The CSV to write.
        fingerprint: Identifies the model and decoding settings: a journal written with others is not reused.
        column: Name of the generated column (default: ``description``, or ``generated_description`` when the
            input already has a ``description`` column: every input column is kept as it was).
    """

    def __init__(self, output: str | Path, fingerprint: str = "", column: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output, self.fingerprint, self.column = Path(output), fingerprint, column
        self.done: dict[int, dict] = {}
        self._journal = None
        self._started, self._titles, self._resumed = 0.0, 0, 0

    def _header(self, dm) -> dict:
        src = dm.predict_input.path
        stat = src.stat()
        key = f"{src.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{self.fingerprint}"
        return {"journal": "titlegen-predict", "key": hashlib.sha1(key.encode()).hexdigest()}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        dm = trainer.datamodule
        self.column = output_column(dm.predict_input.header, self.column)
        header, path = self._header(dm), journal_path(self.output, trainer.global_rank, trainer.world_size)
        self.done = self._read_journals(header)
        if self.done and trainer.global_rank == 0:
            log.info("predict: resuming from %s (%d of %d rows already done)", self.output.name + ".partial*.jsonl",
                     len(self.done), len(dm.predict_input.rows))
        self._resumed = len(self.done)
        dm.predict_skip = set(self.done)  # the same on every rank, so each takes the same share of what is left
        self.output.parent.mkdir(parents=True, exist_ok=True)
        trainer.strategy.barrier()  # every rank has read every journal before any rank starts writing its own
        fresh = not self._read_journal(path, header, warn=False)
        self._journal = path.open("w" if fresh else "a", encoding="utf-8")
        if fresh:
            self._append(header)
        self._started, self._titles = time.perf_counter(), 0

    def _read_journals(self, header: dict) -> dict[int, dict]:
        done: dict[int, dict] = {}
        for path in journals(self.output):
            done.update(self._read_journal(path, header))
        return done

    @staticmethod
    def _read_journal(path: Path, header: dict, warn: bool = True) -> dict[int, dict]:
        if not path.is_file():
            return {}
        lines = path.read_text(encoding="utf-8").splitlines()
        try:
            if not lines or json.loads(lines[0]) != header:
                if warn:
                    log.warning("predict: %s belongs to another input or model; starting over", path)
                return {}
        except json.JSONDecodeError:
            return {}
        done = {}
        for line in lines[1:]:
            try:
                item = json.loads(line)
            except json.JSONDecodeError:  # the line being written when the process died
                continue
            done[item["row"]] = item
        return done

    def _append(self, item: dict) -> None:
        self._journal.write(json.dumps(item, ensure_ascii=False) + "\n")
        self._journal.flush()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        for row, out in zip(prediction["row"], prediction["outputs"]):
            item = {"row": row, "description": out.text, "stopped": out.stopped, "tokens": out.num_tokens}
            self.done[row] = item
            self._append(item)
        self._titles += len(prediction["row"])
        show_rate(trainer, self._titles, self._titles / max(time.perf_counter() - self._started, 1e-9))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._journal.close()
        trainer.strategy.barrier()  # every rank's journal is complete
        if trainer.global_rank != 0:
            return
        predict_input = trainer.datamodule.predict_input
        self.done = self._read_journals(self._header(trainer.datamodule))
        write_csv(self.output, predict_input.header + [self.column], predict_input.rows, self.done)
        for path in journals(self.output):
            path.unlink(missing_ok=True)
        stopped = sum(1 for d in self.done.values() if d["stopped"])
        rate = (len(self.done) - self._resumed) / max(time.perf_counter() - self._started, 1e-9)  # all ranks
        pl_module.print(f"predictions: {self.output} ({len(predict_input.rows)} rows; "
                        f"{stopped}/{len(self.done)} descriptions ended with EOS; {rate:.2f} titles/s)")


def show_rate(trainer: L.Trainer, titles: int, rate: float) -> None:
    """Put titles/s on the predict progress bar (Lightning's counts batches)."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    bar = trainer.progress_bar_callback
    text = f"{titles} titles, {rate:.2f} titles/s"
    if isinstance(bar, RichProgressBar) and bar.progress is not None and bar.predict_progress_bar_id is not None:
        bar.progress.update(bar.predict_progress_bar_id, description=f"Predicting ({text})")
    elif isinstance(bar, TQDMProgressBar) and bar._predict_progress_bar is not None:
        bar.predict_progress_bar.set_postfix_str(text, refresh=False)


def output_column(header: list[str], wanted: str | None = None) -> str:
    """The name of the generated column: never one the input already has (its values would be lost)."""
    if wanted:
        if wanted in header:
            raise TitlegenError(f"--output_column {wanted}: the input already has a column of that name")
        return wanted
    for name in ("description", "generated_description"):
        if name not in header:
            return name
    raise TitlegenError("the input has both 'description' and 'generated_description' columns: "
                        "name the generated one with --output_column")


def write_csv(output: Path, fields: list[str], rows: list[list[str]], done: dict[int, dict]) -> None:
    """Every input column (repeated names too) plus the generated one, in input order; rows never generated
    (empty title) get ''."""

    def table(fh) -> None:
        writer = csv.writer(fh)
        writer.writerow(fields)
        for i, row in enumerate(rows):
            writer.writerow([*row, done.get(i, {}).get("description", "")])

    atomic_write(output, table)
