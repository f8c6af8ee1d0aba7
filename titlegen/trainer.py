"""Lightning's Trainer with titlegen's two extra subcommands: ``prepare`` (build the data cache and stop) and
``evaluate`` (untuned base versus fine-tuned)."""

from __future__ import annotations

import lightning as L

from titlegen.eval.compare import run_evaluation


class TitlegenTrainer(L.Trainer):
    """Lightning's Trainer plus ``prepare`` and ``evaluate`` (subcommands of the CLI)."""

    def prepare(self, model: L.LightningModule, datamodule: L.LightningDataModule) -> str:
        """Clean, split and tokenize ``data.path`` into ``data.cache_dir``, then stop (no model is loaded).

        Tokenize on a cheap CPU machine, copy the cache directory beside the GPU machine's checkout (or point
        ``data.cache_dir`` at it), and ``fit`` with the same data settings finds it by its key.

        Args:
            model: Unused (the tokenizer comes from ``model.backbone.name_or_path``).
            datamodule: The data settings: the same as ``fit``'s, so the cache key matches.
        """
        path = datamodule.build_cache()
        print(f"prepared: {path}")
        return str(path)

    def evaluate(self, model: L.LightningModule, datamodule: L.LightningDataModule, ckpt_path: str | None = None,
                 report_dir: str | None = None, num_examples: int = 8) -> dict:
        """Compare the untuned base with the fine-tuned adapter on the evaluation rows.

        Args:
            model: The module (its ``adapter_path`` or ``ckpt_path`` gives the fine-tuned weights).
            datamodule: Provides the rows: ``data.eval_path``, else the test split, else the validation split.
            ckpt_path: A ``.ckpt`` file or an exported adapter directory.
            report_dir: Where ``report.json``, ``report.md`` and ``generations.csv`` go (default: ``eval/`` in
                the run directory of the checkpoint or adapter).
            num_examples: Rows shown side by side in the Markdown report.
        """
        return run_evaluation(self, model, datamodule, ckpt_path, report_dir, num_examples)
