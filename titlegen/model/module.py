"""LightningModule: a 4-bit causal LM with LoRA adapters, trained on response tokens only."""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torchmetrics.aggregation import SumMetric

from titlegen.errors import TitlegenError
from titlegen.eval import baseline
from titlegen.eval.samples import log_samples
from titlegen.eval.split import split_generation_metrics, wanted
from titlegen.generate.engines import generate
from titlegen.generate.settings import GenerationSettings
from titlegen.model import backbone as bb
from titlegen.model import levers, sharding
from titlegen.model.attention import PACKED_ATTENTION, packed_forward_kwargs
from titlegen.model.lora import LoraSettings, adapter_off, attach_lora, cast_adapter, load_adapter, unwrap
from titlegen.model.loss import response_loss
from titlegen.model.merge import merge_into_dense
from titlegen.model.microbatch import OomBackoff, rows_in
from titlegen.model.optim import without_gpu_syncs
from titlegen.model.schedule import ScheduleSettings, build_scheduler, resize_note

log = logging.getLogger("titlegen")


class TitleGenModule(L.LightningModule):
    """Fine-tunes LoRA adapters on a (4-bit) causal LM to write a description from a title.

    Args:
        backbone: The base model and how to load it.
        lora: LoRA adapter settings.
        optimizer: Optimizer for the adapter weights (``torch.optim.AdamW``, ``bitsandbytes.optim.AdamW8bit``,
            ``bitsandbytes.optim.PagedAdamW32bit``, ...) with its arguments.
        scheduler: Warmup and decay of the learning rate.
        generation: Decoding settings for validation samples and predict.
        adapter_path: An exported adapter directory to start from (predict/validate/test); frozen.
        loss_chunk_tokens: Response tokens per chunk of the output head in the loss (memory vs. speed).
        eval_generation: Generation metrics of the validation/test split (ROUGE, BLEU, chrF, EOS-stop rate, ...,
            to TensorBoard and a report in the run directory): ``standalone`` in the validate/test commands,
            ``always`` at every validation during fit too (slow), ``off`` never.
        merge_for_predict: In ``predict``, dequantize the 4-bit base once and fold the adapter into it
            (bf16 on GPU): the same function without per-step dequantization, faster for more memory (README:
            the figures).
        oom_backoff: On a GPU out-of-memory error in training, retry the step with each batch split in two (again
            and again, down to one example per part): smaller micro-batches, the same effective batch and loss.
            One device only. Off: the run stops with the batch settings to lower.
    """

    def __init__(self, backbone: bb.BackboneConfig, lora: LoraSettings = LoraSettings(),
                 optimizer: OptimizerCallable | None = None, scheduler: ScheduleSettings = ScheduleSettings(),
                 generation: GenerationSettings = GenerationSettings(), adapter_path: str | None = None,
                 loss_chunk_tokens: int = 1024, merge_for_predict: bool = False,
                 eval_generation: Literal["standalone", "always", "off"] = "standalone",
                 oom_backoff: bool = False) -> None:
        super().__init__()
        self.backbone_cfg, self.lora = backbone, lora
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW, lr=2e-4)
        self.schedule, self.generation = scheduler, generation
        self.adapter_path, self.loss_chunk_tokens = adapter_path, loss_chunk_tokens
        self.merge_for_predict, self.eval_generation = merge_for_predict, eval_generation
        self.oom_backoff = OomBackoff() if oom_backoff else None
        self.model: torch.nn.Module | None = None
        self._graphs = None
        self.tokenizer = None
        self.use_adapter = True  # evaluate switches it off to score the untuned base with the same weights
        self.val_loss_sum, self.val_tokens = SumMetric(), SumMetric()
        self._val_batches = 0
        self.baseline_logged = False  # the untuned model's validation, at step 0 (eval/baseline.py)
        self._schedule_steps: int | None = None  # optimizer steps the learning-rate schedule spans
        self._resumed_schedule: tuple[int, int] | None = None  # (step, schedule steps) of a resumed checkpoint
        # Checkpoints hold only the adapter: the frozen (4-bit) base is rebuilt from backbone.name_or_path.
        self.strict_loading = False

    # ---- model ---------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        base = bb.load_base_model(self.backbone_cfg, device)
        if self.adapter_path:
            self.model = load_adapter(base, self.adapter_path)
        else:
            self.model = attach_lora(base, self.lora)
        self.model.train()  # from_pretrained returns eval mode, which would switch LoRA dropout off
        self.tokenizer = bb.load_tokenizer(self.backbone_cfg.name_or_path, self.backbone_cfg.trust_remote_code)
        self._decoder = bb.split_decoder(self.model)
        fit = self._trainer is not None and self.trainer.state.fn == "fit"
        levers.prepare_training(self.model, self.backbone_cfg, fit=fit)
        sharding.shard_if_asked(self._trainer, self.model)  # FSDP2 under ModelParallelStrategy
        if fit:  # the training trunk as CUDA graphs (model.backbone.training_graphs), or None
            self._graphs = levers.training_graphs(self.model, self.backbone_cfg, self.tokenizer.pad_token_id, device)
        context = getattr(self.model.config, "max_position_embeddings", None)
        if self._trainer is not None and self.trainer.datamodule is not None and context:
            # predict cuts titles whose prompt would leave no room for the tokens to generate
            self.trainer.datamodule.max_prompt_tokens = context - self.generation.max_new_tokens
        trainable, total = bb.count_parameters(self.model)
        adapter = f"adapter {self.adapter_path} (frozen)" if self.adapter_path else f"{trainable / 1e6:.2f}M trainable (LoRA)"
        self.print(f"model: {total / 1e6:.1f}M parameters, {adapter}")

    def on_predict_start(self) -> None:
        # After any checkpoint restore, so the adapter weights being merged are the trained ones.
        dtype = bb.resolve_dtype(self.backbone_cfg.compute_dtype, self.device)  # bf16, or fp16 where there is none
        if self.device.type == "cuda" and not self.merge_for_predict:
            # Adapter weights in the compute dtype: PEFT would otherwise cast every layer input up to fp32 (and
            # autocast back) at every decoding step; the matmuls run in that dtype under autocast either way.
            cast_adapter(self.model, dtype)
        if self.merge_for_predict and unwrap(self.model) is not self.model:
            dtype = dtype if self.device.type == "cuda" else None
            self.model = merge_into_dense(self.model, dtype=dtype).eval()
            self._decoder = bb.split_decoder(self.model)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.print("predict: 4-bit base dequantized and adapter merged (dense weights)")

    def trainable_names(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def adapter_scope(self):
        """A context in which the LoRA adapter is on (default) or off (the untuned base)."""
        return adapter_off(self.model, off=not self.use_adapter)

    def forward_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response-token loss and token count of a batch."""
        with self.adapter_scope():
            return self._forward_loss(batch)

    def _forward_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "cu_seq_lens" in batch:  # packed: boundaries go to the attention, no mask is built
            if self.backbone_cfg.attn_implementation != PACKED_ATTENTION:
                # Any other attention would let packed examples see each other, silently.
                raise TitlegenError(f"data.packing needs model.backbone.attn_implementation: {PACKED_ATTENTION}")
            if self._graphs is not None and self.training and torch.is_grad_enabled():
                hidden, labels = self._graphs(batch)  # the row padded to a recorded length
                return response_loss(hidden, self._decoder.head, labels, self.loss_chunk_tokens)
            kwargs = packed_forward_kwargs(batch)
        else:
            if self._graphs is not None and self.training:
                raise TitlegenError("model.backbone.training_graphs: needs packed batches (data.packing true)")
            mask = batch.get("attention_mask")
            if mask is not None and bool(mask.all()):
                mask = None  # no padding: lets SDPA take its fast causal path
            kwargs = {"attention_mask": mask}
        out = self._decoder.trunk(input_ids=batch["input_ids"], use_cache=False, **kwargs)
        return response_loss(out[0], self._decoder.head, batch["labels"], self.loss_chunk_tokens)

    # ---- training ------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.oom_backoff is not None:
            loss = self.oom_backoff.step(self, batch)  # backward done here, in parts that fit
        else:
            loss_sum, count = self.forward_loss(batch)
            loss = loss_sum / count.clamp(min=1)
        size = rows_in(batch)
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, batch_size=size)
        return loss

    def on_train_epoch_start(self) -> None:
        if self._graphs is not None and hasattr(self.trainer.datamodule, "longest_train_row"):
            self._graphs.reserve(self.trainer.datamodule.longest_train_row())  # one pool size for the epoch

    def configure_optimizers(self) -> dict:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise TitlegenError("nothing to train: the model has no trainable (LoRA) parameters")
        optimizer = without_gpu_syncs(self.optimizer_factory(params))
        total = self._schedule_steps = int(self.trainer.estimated_stepping_batches)
        resumed = self._resumed_schedule
        if resumed and resumed[1] != total:  # max_steps/epochs changed: say what that does to the rate
            log.warning(resize_note(resumed[0], resumed[1], total, self.schedule))
        scheduler = build_scheduler(optimizer, self.schedule, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- evaluation ----------------------------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss_sum, count = self.forward_loss(batch)
        self.val_loss_sum.update(loss_sum.detach().float())
        self.val_tokens.update(count.float())
        self._val_batches += 1

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")

    def _end_eval(self, split: str) -> None:
        tokens = self.val_tokens.compute()
        loss = (self.val_loss_sum.compute() / tokens.clamp(min=1)).item()
        metrics = {f"{split}/loss": loss, f"{split}/ppl": math.exp(min(loss, 50.0))}
        self.val_loss_sum.reset(), self.val_tokens.reset()
        seen, self._val_batches = self._val_batches, 0
        if self.trainer.sanity_checking:
            # Lightning drops metrics logged in the sanity check; when it covered the whole validation set of a
            # fresh run, record it as step 0: the untuned model's loss and samples, the baseline of every curve.
            if seen >= sum(self.trainer.num_val_batches) and self.global_step == 0 and self.logger is not None:
                self.logger.log_metrics(metrics, step=0)
                log_samples(self, step=0)
                self.baseline_logged = True
            return
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name.endswith("loss"), sync_dist=False)
        if wanted(self.eval_generation, self.trainer.state.fn.value):
            split_generation_metrics(self, split, metrics)
        if split == "val":
            log_samples(self, step=self.global_step)
            if baseline.wanted_now(self):
                baseline.log_untuned_baseline(self)

    # ---- predict -------------------------------------------------------------------------------------------
    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        with self.adapter_scope():
            outputs = generate(self.model, self.tokenizer, batch, self.generation)
        return {"row": batch["row"].tolist(), "outputs": outputs}

    # ---- checkpoints: adapter tensors only -----------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        # RNG state too, so LoRA dropout after a resume draws the same masks as an uninterrupted run.
        checkpoint["titlegen_rng"] = {"cpu": torch.get_rng_state(),
                                      "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        checkpoint["titlegen_schedule_steps"] = self._schedule_steps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.configure_model()
        if checkpoint.get("titlegen_schedule_steps"):
            self._resumed_schedule = (checkpoint.get("global_step", 0), checkpoint["titlegen_schedule_steps"])
        rng = checkpoint.get("titlegen_rng")
        if rng is not None and self.trainer.state.fn == "fit":
            torch.set_rng_state(rng["cpu"])
            if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])
        saved, expected = set(checkpoint["state_dict"]), self.trainable_names()
        if saved != expected:
            raise TitlegenError(
                f"checkpoint adapter does not match model.lora/model.backbone: {len(saved - expected)} unexpected "
                f"and {len(expected - saved)} missing tensors (train and load with the same config)")
