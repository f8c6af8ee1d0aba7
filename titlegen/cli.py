"""``python -m titlegen {fit,validate,test,predict,prepare,evaluate}``: LightningCLI with titlegen's defaults.

``titlegen/base.yaml`` (package data; ``configs/base.yaml`` points to it) is always loaded first; ``--config``
files and flags override it. Bad input ends with one line on stderr (``titlegen: error: ...``) and exit code 2,
never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import sys
import threading
from pathlib import Path

import torch
from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from titlegen.checks import check_config_files, check_output, check_settings, out_of_memory
from titlegen.data.datamodule import TitleDataModule
from titlegen.errors import TitlegenError
from titlegen.generate.writer import CSVPredictionWriter
from titlegen.model.callbacks import AdapterExport, StepProgressBar, ThroughputLogger
from titlegen.model.lora import adapter_base, check_adapter_dir
from titlegen.model.module import TitleGenModule
from titlegen.model.safety import UNREADABLE, GracefulStop, ReadableCheckpointIO, unreadable_checkpoint
from titlegen.quiet import quiet_third_party
from titlegen.trainer import TitlegenTrainer

BASE_CONFIG = Path(__file__).resolve().parent / "base.yaml"  # package data: installed with titlegen
log = logging.getLogger("titlegen")
SUBCOMMANDS = ("fit", "validate", "test", "predict", "prepare", "evaluate")
CKPT_HELP = {
    "fit": "Resume from this .ckpt (loop, optimizer and data position restored); 'last' picks the newest "
           "last.ckpt under trainer.default_root_dir.",
    "evaluate": "The fine-tuned weights: an exported adapter directory (its prompt.yaml is used too) or a .ckpt "
                "file; 'last'/'best' look under trainer.default_root_dir.",
    "other": "An exported adapter directory (its prompt.yaml is used too) or a .ckpt file; 'last'/'best' look "
             "under trainer.default_root_dir. Without it the untuned base model answers.",
}


class TitlegenCLI(LightningCLI):
    """LightningCLI wired for titlegen: linked arguments, run directories, checkpoint/adapter resolution."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "prepare": {"model", "datamodule"}, "evaluate": {"model", "datamodule"}}

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        for action in parser._actions:  # Lightning's text knows nothing of adapter directories
            if "--ckpt_path" in action.option_strings:
                action.help = CKPT_HELP.get(subcommand, CKPT_HELP["other"])
        return parser

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except torch.OutOfMemoryError:
            raise TitlegenError(out_of_memory(self.config[subcommand], subcommand)) from None
        except ValueError as err:  # Lightning's check of an epoch shorter than the validation interval
            if "val_check_interval" not in str(err):
                raise
            raise TitlegenError(f"{' '.join(str(err).split())} (or set --trainer.val_check_interval lower)") from None

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint here for hyperparameters (titlegen saves none): a broken file is one line.
        try:
            super()._parse_ckpt_path()
        except UNREADABLE as err:
            ckpt = self.config[self.config.subcommand].get("ckpt_path")
            raise TitlegenError(unreadable_checkpoint(ckpt, err)) from None

    def add_arguments_to_parser(self, parser) -> None:
        # Say each value once: the data is tokenized with the model's own tokenizer.
        parser.link_arguments("model.backbone.name_or_path", "data.tokenizer")
        parser.link_arguments("model.backbone.trust_remote_code", "data.trust_remote_code")
        parser.add_argument("--output", type=str | None, default=None,
                            help="predict: the CSV to write (every input column + the generated description)")
        parser.add_argument("--output_column", type=str | None, default=None,
                            help="predict: name of the generated column (default: description, or "
                                 "generated_description when the input has a description column)")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="predict: replace an existing --output file (never the input itself)")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        check_settings(cfg, self.subcommand)
        ckpt = cfg.get("ckpt_path")
        if self.subcommand != "fit" and ckpt and not cfg.model.backbone.name_or_path and Path(ckpt).is_dir():
            # An adapter records its base: `predict --ckpt_path ADAPTER` needs no config to find it.
            cfg.model.backbone.name_or_path = cfg.data.tokenizer = adapter_base(ckpt) or ""

    def instantiate_trainer(self, **kwargs):
        cfg = self._get(self.config_init, "trainer", default={})
        ckpt = self._resolve_checkpoint(cfg.get("default_root_dir") or "checkpoints/run")
        if self.subcommand in ("predict", "evaluate", "prepare"):
            kwargs["logger"] = False  # they write a CSV or a report, not a run directory (nor its config.yaml)
            self.save_config_callback = None
        elif cfg.get("logger") in (None, True):
            kwargs["logger"] = self._run_logger(cfg, ckpt)
        extra = [ThroughputLogger(), GracefulStop(), AdapterExport()] if self.subcommand == "fit" else []
        if self.subcommand == "fit" and cfg.get("enable_progress_bar") is not False:
            extra.append(StepProgressBar())
        if not cfg.get("plugins"):
            kwargs["plugins"] = [ReadableCheckpointIO()]
        if self.subcommand == "predict":
            self.config_init["predict"]["return_predictions"] = False  # the writer keeps them; memory stays flat
            extra.append(self._prediction_writer())
        callbacks = list(cfg.get("callbacks") or [])
        if cfg.get("enable_checkpointing") is False:  # base.yaml's checkpoint callbacks would make it an error
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        kwargs["callbacks"] = callbacks + extra
        return super().instantiate_trainer(**kwargs)

    def _run_logger(self, cfg: dict, ckpt: Path | None) -> TensorBoardLogger:
        """TensorBoard in <default_root_dir>/version_N/; a resumed fit continues in its checkpoint's run."""
        root = cfg.get("default_root_dir") or "checkpoints/run"
        version = None
        if self.subcommand == "fit" and ckpt is not None:
            run = ckpt.parent.parent
            if ckpt.parent.name == "checkpoints" and run.parent.resolve() == Path(root).resolve():
                version = run.name if run.name.startswith("version_") else None
            else:
                log.warning("resuming %s in a new run under %s (its own run is %s; pass --trainer.default_root_dir "
                            "%s to continue there)", ckpt, root, run, run.parent)
        return TensorBoardLogger(save_dir=root, name="", version=version, default_hp_metric=False)

    def _prediction_writer(self) -> CSVPredictionWriter:
        cfg = self.config["predict"]
        output = check_output(cfg.get("output"), self.datamodule.predict_path, cfg.get("overwrite"))
        ident = {"model": cfg.model.as_dict(), "ckpt": cfg.get("ckpt_path"), "prompt": cfg.data.prompt.as_dict()}
        fingerprint = hashlib.sha1(json.dumps(ident, default=str).encode()).hexdigest()
        return CSVPredictionWriter(output, fingerprint, cfg.get("output_column"))

    def _resolve_checkpoint(self, root: str) -> Path | None:
        """Turn ``--ckpt_path`` into an existing ``.ckpt`` file, or (not for fit) an adapter directory whose
        weights and ``prompt.yaml`` are used instead. ``last``/``best`` are looked up under ``root``."""
        cfg = self.config_init[self.subcommand]
        ckpt = cfg.get("ckpt_path")
        if ckpt in ("last", "best"):
            ckpt = cfg["ckpt_path"] = str(find_checkpoint(root, ckpt))
        if ckpt is None:
            if self.model.adapter_path:
                self.datamodule.use_prompt_from(self.model.adapter_path)
            return None
        path = Path(ckpt)
        if path.is_dir() and self.subcommand != "fit":
            self.model.adapter_path = str(check_adapter_dir(path))
            self.datamodule.use_prompt_from(path)
            cfg["ckpt_path"] = None
            return None
        if path.is_dir():
            raise TitlegenError(f"{path}: fit --ckpt_path resumes from a .ckpt file, not an adapter directory")
        if not path.is_file():
            raise TitlegenError(f"{path}: checkpoint not found")
        return path


def find_checkpoint(root: str, which: str) -> Path:
    """The newest ``last.ckpt`` (or best-scoring ``.ckpt`` of the newest run) under ``root``."""
    runs = sorted(Path(root).glob("version_*/checkpoints"), key=lambda p: p.stat().st_mtime)
    for run in reversed(runs):
        found = [run / "last.ckpt"] if which == "last" else [p for p in run.glob("*.ckpt") if p.name != "last.ckpt"]
        found = [p for p in found if p.is_file()]
        if found:
            return max(found, key=lambda p: p.stat().st_mtime)
    raise TitlegenError(f"{root}: no {which} checkpoint found (looked in version_*/checkpoints/)")


def stop_on_sigterm() -> None:
    """SIGTERM (``kill``, a scheduler's time limit, a preempted VM) stops a run the way Ctrl-C does: predict keeps
    its journal of finished rows, and the process ends instead of running to the end."""

    def interrupt(signum, frame) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def main(args: list[str] | None = None) -> None:
    """Entry point; ``args`` lets tests run the CLI in-process."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("titlegen").setLevel(logging.INFO)
    quiet_third_party()
    stop_on_sigterm()
    if not BASE_CONFIG.is_file():  # a broken install: without it every default would silently differ
        raise SystemExit(f"titlegen: error: {BASE_CONFIG} is missing from the installed package; reinstall titlegen")
    # No abbreviations (--trainer.max_step is a typo, not max_steps); errors raised, not printed after the usage.
    strict = {"allow_abbrev": False, "exit_on_error": False}
    defaults = {"default_config_files": [str(BASE_CONFIG)], **strict}
    try:
        check_config_files(sys.argv[1:] if args is None else args)
        cli = TitlegenCLI(TitleGenModule, TitleDataModule, trainer_class=TitlegenTrainer,
                          parser_kwargs={"prog": "python -m titlegen", **strict,
                                         **{c: dict(defaults) for c in SUBCOMMANDS}},
                          auto_configure_optimizers=False, save_config_kwargs={"overwrite": True}, args=args)
    except TitlegenError as err:
        print(f"titlegen: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None

    except KeyboardInterrupt:  # Ctrl-C or SIGTERM outside Lightning's loops (prepare, model loading)
        print("titlegen: stopped by an interrupt; finished work is kept (run the same command to continue)",
              file=sys.stderr)
        raise SystemExit(130) from None
    except ArgumentError as err:  # one line, not 80 lines of usage first
        message = " ".join(str(err).split())
        print(f"titlegen: error: {message} (python -m titlegen SUBCOMMAND --help lists the options)", file=sys.stderr)
        raise SystemExit(2) from None
    stopped = [c.exit_code for c in cli.trainer.callbacks if isinstance(c, GracefulStop) and c.stopped_by]
    if stopped:  # not finished: a scheduler must not take the run for done
        raise SystemExit(stopped[0])
