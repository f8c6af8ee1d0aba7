"""bitsandbytes' 8-bit optimizers without a GPU synchronization after every parameter.

Their ``step`` waits for the GPU after each parameter's update, which paged states need. With plain states the
updates are ordered on one CUDA stream anyway, so the waits only cost time: about 450 of them per step for LoRA on
every projection of a 32-layer model, each a host round trip with the GPU idle. The loop below is bitsandbytes'
own, minus the waits and the (paged-only) prefetch; paged optimizers keep their step.
"""

from __future__ import annotations

import types

import torch


def without_gpu_syncs(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``optimizer`` itself, its step replaced when it is a non-paged bitsandbytes optimizer."""
    is_bnb = type(optimizer).__module__.startswith("bitsandbytes.") and hasattr(optimizer, "update_step")
    if is_bnb and not getattr(optimizer, "is_paged", True):
        optimizer.step = types.MethodType(_step, optimizer)
    return optimizer


@torch.no_grad()
def _step(self, closure=None):
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    if not self.initialized:
        self.check_overrides()
        self.to_gpu()
        self.initialized = True
    for gindex, group in enumerate(self.param_groups):
        for pindex, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if len(self.state[p]) == 0:
                self.init_state(group, p, gindex, pindex)
            self.update_step(group, p, gindex, pindex)
    return loss
