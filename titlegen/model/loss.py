"""Next-token cross-entropy on response tokens only, without full-vocabulary logits for the whole batch.

The output head runs only at positions whose next token is a response token, in chunks whose logits are
recomputed in the backward pass instead of stored: with a 128k vocabulary, 8k tokens of float32 logits would
take 4 GiB, a 2k-token chunk 1 GiB once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from titlegen.data.encoding import IGNORE_INDEX


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def response_loss(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor,
                  chunk_tokens: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and number of predicted tokens. Position t predicts ``labels[t + 1]``."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    selected, targets = hidden[:, :-1][keep], targets[keep]
    count = keep.sum()
    if selected.shape[0] == 0:
        return hidden.sum() * 0.0, count  # keeps the graph connected so DDP/backward do not fail
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
