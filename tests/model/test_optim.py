"""The 8-bit optimizer's step without GPU waits makes the same updates as bitsandbytes' own."""

from __future__ import annotations

import bitsandbytes as bnb
import torch

from titlegen.model.optim import without_gpu_syncs


def _train(fast: bool, paged: bool = False) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 64)) for _ in range(3)] + [torch.nn.Parameter(torch.randn(8))]
    cls = bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit
    opt = cls(params, lr=1e-2, weight_decay=0.01, min_8bit_size=16)
    if fast:
        opt = without_gpu_syncs(opt)
    for step in range(4):
        opt.zero_grad()
        loss = sum(((p - step) ** 2).sum() for p in params[:3])  # the last parameter gets no gradient
        opt.step(closure=lambda loss=loss: loss.backward() or loss)
    return [p.detach().clone() for p in params], opt


def test_the_step_without_waits_makes_the_same_updates():
    torch.manual_seed(0)
    start = [torch.randn(64, 64) for _ in range(3)] + [torch.randn(8)]
    ref, opt_ref = _train(fast=False)
    got, opt = _train(fast=True)
    assert "step" in vars(opt) and "step" not in vars(opt_ref)  # replaced on the instance only
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    assert all(not torch.equal(g, s) for g, s in zip(got[:3], start[:3]))  # they moved
    assert torch.equal(got[3], start[3])  # no gradient, no update
    assert opt.state[opt.param_groups[0]["params"][0]]["state1"].dtype == torch.uint8  # 8-bit states


def test_paged_optimizers_keep_their_step():
    _, opt = _train(fast=True, paged=True)
    assert "step" not in vars(opt)
