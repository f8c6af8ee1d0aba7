"""The untuned baseline of every validation curve, logged at step 0 without holding up the first step.

The untuned model is the base with the adapter switched off (a new LoRA adapter adds exactly zero), so its loss
can be measured at any point of a run, not only before training. Unless the sanity check already covered the
whole validation set (``trainer.num_sanity_val_steps: -1``), titlegen measures it at the first validation of a new
run, beside the adapter's, and logs it at step 0: training starts at once, even where a full validation takes
long (2,000 rows on 2 CPU cores: 11 minutes).
"""

from __future__ import annotations

import math

import torch

from titlegen.eval.samples import log_samples
from titlegen.model.lora import adapter_off


def wanted_now(module) -> bool:
    trainer = module.trainer
    return (trainer.state.fn == "fit" and not trainer.sanity_checking and trainer.ckpt_path is None
            and module.logger is not None and not module.baseline_logged)


@torch.no_grad()
def log_untuned_baseline(module) -> None:
    """Validation loss and samples of the base model alone, logged at step 0 (every rank takes part)."""
    module.baseline_logged = True
    loss_sum, tokens = module.val_loss_sum, module.val_tokens  # sum across ranks in compute()
    with adapter_off(module.model), module.trainer.precision_plugin.forward_context():
        for batch in module.trainer.val_dataloaders:
            batch = {k: v.to(module.device) for k, v in batch.items()}
            part, count = module._forward_loss(batch)
            loss_sum.update(part.float())
            tokens.update(count.float())
    loss = (loss_sum.compute() / tokens.compute().clamp(min=1)).item()
    loss_sum.reset(), tokens.reset()
    module.logger.log_metrics({"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}, step=0)
    with adapter_off(module.model):
        log_samples(module, step=0)
