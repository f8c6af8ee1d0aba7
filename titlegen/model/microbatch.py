"""Out-of-memory back-off: split a training batch into smaller micro-batches whose gradients add up to the batch's.

With ``model.oom_backoff``, a step that runs out of GPU memory is retried with each batch cut into twice as many
parts: every part runs forward and backward on its own, so the activations held at once shrink, while the
gradient stays the batch's (each part's summed loss is divided by the whole batch's token count, not its own)
and the optimizer still steps once per batch. The effective batch and the loss curve do not change; only the
micro-batch halves and the accumulation inside the step doubles.
"""

from __future__ import annotations

import logging

import torch

from titlegen.data.encoding import IGNORE_INDEX

log = logging.getLogger("titlegen")
PACKED_KEYS = ("input_ids", "labels", "position_ids")


def rows_in(batch: dict) -> int:
    """Examples in a batch: padded rows, or packed segments."""
    return int(batch["cu_seq_lens"].numel() - 1) if "cu_seq_lens" in batch else int(batch["input_ids"].shape[0])


def split_batch(batch: dict, parts: int) -> list[dict]:
    """``batch`` cut into at most ``parts`` batches of whole examples (consecutive, nearly equal in count)."""
    rows = rows_in(batch)
    parts = max(1, min(parts, rows))
    edges = [round(i * rows / parts) for i in range(parts + 1)]
    if "cu_seq_lens" in batch:
        return [_packed_slice(batch, a, b) for a, b in zip(edges, edges[1:])]
    return [{k: (v[a:b] if torch.is_tensor(v) and v.dim() and v.shape[0] == rows else v) for k, v in batch.items()}
            for a, b in zip(edges, edges[1:])]


def _packed_slice(batch: dict, first: int, end: int) -> dict:
    """Segments ``first``..``end``-1 of a packed row, with their own boundaries (padding segments included)."""
    bounds = batch["cu_seq_lens"]
    start, stop = int(bounds[first]), int(bounds[end])
    out = {k: batch[k][:, start:stop] for k in PACKED_KEYS if k in batch}
    out["cu_seq_lens"] = (bounds[first:end + 1] - start).to(bounds.dtype)
    out["max_length"] = (out["cu_seq_lens"][1:] - out["cu_seq_lens"][:-1]).max()
    return out


class GradSnapshot:
    """The trainable parameters' gradients at the start of a step (LoRA only: small), to put back when a step is
    retried after running out of memory half-way, so no part's gradient counts twice."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params
        self.grads = [None if p.grad is None else p.grad.detach().clone() for p in params]

    def restore(self) -> None:
        for p, g in zip(self.params, self.grads):
            p.grad = None if g is None else g.clone()

    def taken_since(self, scale: float = 1.0) -> list[torch.Tensor]:
        """What backward added to each gradient since the snapshot, divided by ``scale``."""
        out = []
        for p, g in zip(self.params, self.grads):
            now = torch.zeros_like(p) if p.grad is None else p.grad.detach()
            out.append(((now - g) if g is not None else now) / scale)
        return out


def backward_in_parts(module, batch: dict, parts: int, scale: float) -> torch.Tensor:
    """Forward and backward each part of ``batch``, the losses multiplied by ``scale``; the gradients add up to
    the whole batch's. Returns the batch's mean response-token loss (no graph). A part's first label is never a
    target, in either form: the parts' token counts add up to the batch's."""
    total = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
    loss_sum = torch.zeros((), device=total.device)
    for part in split_batch(batch, parts):
        part_sum, _ = module.forward_loss(part)
        (part_sum / total * scale).backward()
        loss_sum += part_sum.detach().float()
    return loss_sum / total


def gradient_carrier(loss: torch.Tensor, params: list[torch.nn.Parameter], grads: list[torch.Tensor]) -> torch.Tensor:
    """A tensor equal to ``loss`` whose gradient with respect to each parameter is its entry of ``grads``."""
    link = sum((p * g).sum() for p, g in zip(params, grads))
    return loss + (link - link.detach())


class OomBackoff:
    """Runs training steps in parts, doubling the parts whenever a step runs out of GPU memory (kept for the
    rest of the run).

    Lightning clears the gradients between ``training_step`` and its backward call, so the parts' gradients
    are taken out of ``.grad`` and handed back through the returned loss, a carrier whose backward yields
    exactly them: Lightning's own scaling (accumulation, fp16 loss scale) then applies as to any loss.
    """

    def __init__(self) -> None:
        self.parts = 1

    def step(self, module, batch: dict) -> torch.Tensor:
        params = [p for p in module.parameters() if p.requires_grad]
        snapshot = GradSnapshot(params)
        scaler = getattr(module.trainer.precision_plugin, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None else 1.0  # fp16: keeps small gradients alive
        while True:
            try:
                loss = backward_in_parts(module, batch, self.parts, scale)
                break
            except torch.OutOfMemoryError:
                if self.parts >= rows_in(batch):
                    raise
            # Outside the except block: the failed attempt's tensors are freed with its traceback.
            snapshot.restore()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.parts *= 2
            log.warning("out of GPU memory: each batch now runs in %d parts (about %d examples each); the "
                        "effective batch and the loss are unchanged, the step is slower", self.parts,
                        -(-rows_in(batch) // self.parts))
        grads = snapshot.taken_since(scale)
        snapshot.restore()
        return gradient_carrier(loss, params, grads)
