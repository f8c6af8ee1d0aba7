"""The 4-bit model sharded by FSDP2 (what multi-GPU FSDP QLoRA builds on, issue 13): 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("storage", ["uint8", "float32"])
def test_nf4_weights_shard_under_fsdp2_with_the_unsharded_loss_and_gradients(tiny_model_dir, storage):
    """FSDP2 shards each parameter on its own, so the packed 4-bit weights shard in any storage dtype (FSDP1's flat
    parameters need the compute dtype); bitsandbytes rebuilds each gathered weight's 4-bit state from its module.
    Each rank holds half of the packed weights, and the loss and every adapter gradient are the unsharded ones."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
         str(ROOT / "tests" / "model" / "fsdp2_worker.py"), str(tiny_model_dir), storage],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    assert result["loss"] == pytest.approx(result["ref_loss"], rel=1e-6)
    assert result["worst_grad_diff"] < 1e-6
    assert result["packed_full"] > 0 and result["packed_local"] * 2 == result["packed_full"]


def test_uint8_storage_on_a_torch_that_cannot_shard_it_is_refused_before_loading(monkeypatch):
    """torch before 2.13 makes every sharded parameter require gradients, which a uint8 tensor cannot
    (pytorch#177844; seen on the lent GPU's torch 2.11): one line asking for bfloat16 storage, before loading."""
    from titlegen import checks
    from titlegen.errors import TitlegenError

    cfg = {"trainer": {"strategy": "adapter_fsdp"}, "model": {"optimizer": "torch.optim.AdamW", "backbone": {}}}
    monkeypatch.setattr(checks, "_torch_version", lambda: (2, 11))
    with pytest.raises(TitlegenError, match="set --model.backbone.quant_storage bfloat16"):
        checks.check_fsdp2(cfg)
    cfg["model"]["backbone"]["quant_storage"] = "bfloat16"
    checks.check_fsdp2(cfg)
    monkeypatch.setattr(checks, "_torch_version", lambda: (2, 13))
    checks.check_fsdp2({**cfg, "model": {**cfg["model"], "backbone": {}}})


@pytest.mark.parametrize("storage", ["uint8", "bfloat16"])
def test_four_bit_weights_count_as_their_values_in_any_storage(tiny_model_dir, storage):
    import torch

    from titlegen.model import backbone as bb

    cfg = bb.BackboneConfig(name_or_path=str(tiny_model_dir), quant_storage=storage, gradient_checkpointing=False)
    model = bb.load_base_model(cfg, torch.device("cpu"))
    trainable, total = bb.count_parameters(model)
    assert total == sum(v.numel() for v in _dense_weights(tiny_model_dir).values()) > trainable


def _dense_weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")
