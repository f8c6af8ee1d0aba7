"""Runs that do not lose work: a signal stops ``fit`` between two steps with ``last.ckpt`` written, a step with
a non-finite loss is skipped instead of poisoning the weights, and a checkpoint that cannot be read is one clear
line, not a traceback from deep inside ``torch.load``."""

from __future__ import annotations

import logging
import pickle
import signal
import zipfile
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from titlegen.errors import TitlegenError

log = logging.getLogger("titlegen")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
UNREADABLE = (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile)  # what torch.load raises


class GracefulStop(L.Callback):
    """SIGTERM or SIGINT during ``fit`` (a preempted VM, a scheduler's time limit, Ctrl-C): the step in progress
    finishes, ``last.ckpt`` is written, and the run stops; ``fit --ckpt_path last`` then continues exactly there.
    The CLI then exits with 128 + the signal's number, as a shell reports a process ended by that signal."""

    def __init__(self) -> None:
        self.stopped_by: str | None = None
        self.exit_code = 1
        self._requested: str | None = None
        self._previous: dict = {}

    def _request(self, signum, frame) -> None:
        if self._requested is not None:  # a second signal: stop at once
            raise KeyboardInterrupt
        self._requested = signal.Signals(signum).name
        self.exit_code = 128 + signum  # the shell's convention for "ended by this signal"
        log.warning("%s: stopping after this step, writing last.ckpt (send it again to stop at once)",
                    self._requested)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        try:
            self._previous = {s: signal.signal(s, self._request) for s in STOP_SIGNALS}
        except ValueError:  # not the main thread: leave signals alone
            self._previous = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        # Every rank must agree before a collective save, whichever rank the signal reached.
        if not trainer.strategy.reduce_boolean_decision(self._requested is not None, all=False):
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self.stopped_by = self._requested or "signal"
        trainer.should_stop = True
        for callback in trainer.checkpoint_callbacks:  # none may write a last.ckpt of another position over it
            callback.save_last, callback.save_top_k = False, 0
            callback._every_n_train_steps = 0
        log.warning("stopped by %s after step %d; checkpoint: %s (resume: fit --ckpt_path last)",
                    self.stopped_by, trainer.global_step, path)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where ``last.ckpt`` goes: the checkpoint callbacks' folder, else <run dir>/checkpoints."""
    folder = getattr(trainer.checkpoint_callback, "dirpath", None)
    if not folder:
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
    return Path(folder) / "last.ckpt"


class ReadableCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO (it already writes through a temporary file), with a one-line error for a
    checkpoint that is truncated or not a checkpoint at all."""

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except UNREADABLE as err:
            raise TitlegenError(unreadable_checkpoint(path, err)) from None


def unreadable_checkpoint(path, err: BaseException) -> str:
    first = str(err).strip().split(". ")[0][:160] if str(err).strip() else type(err).__name__
    return f"{path}: not a readable checkpoint ({first}); was it cut short while being written? use an earlier .ckpt"


class SkipNonFinite(L.Callback):
    """A step whose loss or gradients are not finite (NaN/inf) is skipped: its gradients are dropped before the
    optimizer sees them, and ``train/skipped_steps`` counts it. After ``max_in_row`` such steps in a row the run
    stops with one clear line, having written ``last.ckpt`` of the last good weights.

    Args:
        max_in_row: Non-finite steps in a row that stop the run.
    """

    def __init__(self, max_in_row: int = 10) -> None:
        if max_in_row < 1:
            raise TitlegenError(f"SkipNonFinite.max_in_row: got {max_in_row}, expected >= 1")
        self.max_in_row, self.skipped, self.in_row = max_in_row, 0, 0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = bool(torch.stack([g.isfinite().all() for g in grads]).all()) if grads else True
        if not trainer.strategy.reduce_boolean_decision(not finite, all=False):
            self.in_row = 0
            pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, batch_size=1)
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # nothing to apply: the weights stay the last good ones
        self.skipped, self.in_row = self.skipped + 1, self.in_row + 1
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, batch_size=1)
        log.warning("step %d: non-finite loss or gradients, step skipped (%d in a row, %d in all)",
                    trainer.global_step, self.in_row, self.skipped)
        if self.in_row >= self.max_in_row:
            path = last_checkpoint_path(trainer)
            trainer.save_checkpoint(path)
            raise TitlegenError(f"{self.in_row} steps in a row with a non-finite loss or gradients; stopped with the "
                                f"last good weights in {path} (lower the learning rate, or check the data)")
