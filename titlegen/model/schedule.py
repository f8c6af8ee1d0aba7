"""Learning-rate schedule with warmup, sized from the trainer's number of optimizer steps."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


@dataclass(frozen=True)
class ScheduleSettings:
    """Warmup, then decay of the learning rate over the run's optimizer steps.

    Attributes:
        kind: ``linear`` decay, ``cosine`` decay, or ``constant`` after warmup.
        warmup_steps: Steps of linear warmup from 0 (wins over ``warmup_ratio`` when > 0).
        warmup_ratio: Warmup as a share of all optimizer steps.
        min_lr_ratio: Learning rate at the end, as a share of the peak.
    """

    kind: Literal["linear", "cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0


def lr_factor(step: int, total: int, s: ScheduleSettings) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based) of ``total``."""
    warmup = s.warmup_steps if s.warmup_steps > 0 else round(s.warmup_ratio * total)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if s.kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 1.0 - progress if s.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return s.min_lr_ratio + (1.0 - s.min_lr_ratio) * shape


def build_scheduler(optimizer: Optimizer, settings: ScheduleSettings, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, max(1, total_steps), settings))


def resize_note(step: int, old_total: int, new_total: int, s: ScheduleSettings) -> str:
    """What a resume with a different number of optimizer steps does to the schedule, in one line."""
    before, after = lr_factor(step, old_total, s), lr_factor(step, new_total, s)
    return (f"resuming at step {step} with {new_total} optimizer steps in all (the checkpoint's run had {old_total}): "
            f"the {s.kind} schedule now spans {new_total} steps, so the learning rate moves from {before:.3g} to "
            f"{after:.3g} of its peak (README: Runs, checkpoints and TensorBoard)")
