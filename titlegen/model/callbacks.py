"""Callbacks: throughput/memory logging and adapter export at the end of training."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar

from titlegen.data.prompts import save_prompt
from titlegen.io import copy_if_present, staged_dir
from titlegen.model import sharding
from titlegen.model.lora import save_adapter


def non_padding_tokens(batch: dict) -> int:
    if "num_tokens" in batch:  # packed
        return int(batch["num_tokens"])
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


class ThroughputLogger(L.Callback):
    """Logs ``train/tokens_per_s`` (non-padding tokens), ``train/padded_tokens_per_s`` and, on a GPU,
    ``train/gpu_peak_gib``, averaged over each ``log_every_n_steps`` window."""

    def __init__(self) -> None:
        self._t0: float | None = None
        self._tokens = self._padded = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self._tokens += int(non_padding_tokens(batch))
        self._padded += int(batch["input_ids"].numel())
        now = time.perf_counter()
        if self._t0 is None:  # the first batch pays for warm-up; start the clock after it
            self._t0, self._tokens, self._padded = now, 0, 0
            return
        if (batch_idx + 1) % trainer.log_every_n_steps:
            return
        elapsed = max(now - self._t0, 1e-9)
        world = trainer.world_size  # every rank trains on as many batches: report the whole job's rate
        metrics = {"train/tokens_per_s": world * self._tokens / elapsed,
                   "train/padded_tokens_per_s": world * self._padded / elapsed}
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            metrics["train/gpu_peak_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        pl_module.log_dict(metrics, on_step=True, batch_size=batch["input_ids"].shape[0])
        self._t0, self._tokens, self._padded = now, 0, 0


class AdapterExport(L.Callback):
    """At the end of ``fit``, writes ``<log_dir>/adapter/``: the LoRA weights in PEFT format
    (``adapter_model.safetensors``, ``adapter_config.json``), ``prompt.yaml``, the tokenizer and the resolved
    ``config.yaml`` — everything ``predict`` (or plain ``peft.PeftModel.from_pretrained``) needs."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask, not only rank 0
        if log_dir is None or any(getattr(c, "stopped_by", None) for c in trainer.callbacks):
            return  # a run stopped by a signal is not finished: its last.ckpt resumes it
        # FSDP: the shards gathered on every rank (a collective), written by rank 0
        state = sharding.full_adapter_state(pl_module.model) if sharding.is_sharded(pl_module.model) else None
        if trainer.global_rank != 0:
            return
        target = Path(log_dir) / "adapter"
        export_adapter(pl_module, trainer.datamodule, target, Path(log_dir) / "config.yaml", state)
        pl_module.print(f"adapter exported: {target}")


def export_adapter(pl_module, datamodule, target: Path, config_file: Path | None = None,
                   state: dict | None = None) -> Path:
    """Write the adapter directory (the run's own output: a resumed fit replaces it) in one rename."""
    with staged_dir(target, replace=True) as staged:
        save_adapter(pl_module.model, staged, state)
        pl_module.tokenizer.save_pretrained(str(staged))
        save_prompt(datamodule.prompt, staged)
        if config_file is not None:
            copy_if_present(config_file, staged)
    return target


class StepProgressBar(RichProgressBar):
    """Lightning's progress bar, whose epoch label under ``max_steps`` read "Epoch 5/-2": here "Epoch 5 (of at most
    60 steps)" when the run is bounded by steps, Lightning's label otherwise."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        label = f"Epoch {current_epoch}" + (f" (of at most {trainer.max_steps} steps)" if trainer.max_steps > 0 else "")
        return f"{label:{len(self.validation_description)}}"
