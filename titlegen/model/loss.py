"""Next-token cross-entropy on response tokens only, without full-vocabulary logits for the whole batch.

The output head runs only at positions whose next token is a response token, in chunks whose logits are never
all stored: with a 128k vocabulary, 8k tokens of float32 logits would take 4 GiB, a 2k-token chunk 1 GiB once. A
frozen head (the usual case) makes its input's gradient in the forward pass, chunk by chunk; any other head's
chunks are recomputed in the backward pass (checkpointing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from titlegen.data.encoding import IGNORE_INDEX
from titlegen.model.fused import compute_dtype


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


class _FrozenHeadLoss(torch.autograd.Function):
    """Summed cross-entropy of a frozen linear head (no bias) whose input gradient is made in the forward pass,
    chunk by chunk: each chunk's logits are made once and dropped, where checkpointing makes them twice (the head's
    matmul and the float32 softmax passes again in the backward). Keeps the gradient (the input's size)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, dtype):
        x, w = hidden.to(dtype), weight.to(dtype)
        grad = torch.empty_like(x)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, x.shape[0], chunk):
            part = slice(start, start + chunk)
            logits = (x[part] @ w.t()).float()  # as the head under autocast, then .float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, targets[part, None]).squeeze(1)).sum()
            probs = logits.sub_(lse[:, None]).exp_()  # d(loss)/d(logits) = softmax - one-hot
            probs[torch.arange(probs.shape[0], device=probs.device), targets[part]] -= 1
            torch.mm(probs.to(dtype), w, out=grad[part])
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return (grad * g).to(ctx.hidden_dtype), None, None, None, None


FUSED_HEAD = True  # the frozen-head loss above when it applies; off: checkpointed chunks (the benchmark compares)


def _frozen_linear(head: torch.nn.Module) -> bool:
    return (FUSED_HEAD and isinstance(head, torch.nn.Linear) and head.bias is None
            and not head.weight.requires_grad)


def response_loss(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor,
                  chunk_tokens: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and number of predicted tokens. Position t predicts ``labels[t + 1]``."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    selected, targets = hidden[:, :-1][keep], targets[keep]
    count = keep.sum()
    if selected.shape[0] == 0:
        return hidden.sum() * 0.0, count  # keeps the graph connected so DDP/backward do not fail
    if torch.is_grad_enabled() and selected.requires_grad and _frozen_linear(head):
        dtype = compute_dtype(head.weight)  # before autocast is switched off below
        with torch.autocast(hidden.device.type, enabled=False):
            return _FrozenHeadLoss.apply(selected, head.weight, targets, chunk_tokens, dtype), count
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, selected.shape[0], chunk_tokens):
        part = slice(start, start + chunk_tokens)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, selected[part], targets[part], head, use_reentrant=False)
        else:
            total = total + _chunk_loss(selected[part], targets[part], head)
    return total, count


def reference_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain computation from full logits, for tests and the fast-path checks."""
    targets = labels[:, 1:].reshape(-1)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    loss = F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (targets != IGNORE_INDEX).sum()
