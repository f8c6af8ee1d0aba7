"""Run by tests/model/test_sharding.py under ``torch.distributed.run`` (2 CPU processes, gloo): the tiny NF4 model
with a LoRA adapter, each decoder layer and the whole model sharded by FSDP2 (``fully_shard``), against the same
model unsharded. Prints one JSON line from rank 0."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from titlegen.model import backbone as bb
from titlegen.model import lora


def build(model_dir: str, storage: str) -> torch.nn.Module:
    cfg = bb.BackboneConfig(name_or_path=model_dir, quant_storage=storage, compute_dtype="float32")
    torch.manual_seed(0)
    model = lora.attach_lora(bb.load_base_model(cfg, torch.device("cpu")), lora.LoraSettings(r=4, alpha=8)).train()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def step(model: torch.nn.Module) -> float:
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item()


def main(model_dir: str, storage: str) -> None:
    dist.init_process_group("gloo")
    reference = build(model_dir, storage)
    ref_loss = step(reference)
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    model = build(model_dir, storage)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in bb.split_decoder(model).trunk.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    loss = step(model)
    worst = max(float((p.grad.full_tensor() - ref_grads[n]).abs().max())
                for n, p in model.named_parameters() if p.requires_grad)
    packed = [p for p in model.parameters() if p.ndim == 2 and p.shape[1] == 1]  # bitsandbytes' packed weights
    local, full = sum(p.to_local().numel() for p in packed), sum(p.numel() for p in packed)
    if dist.get_rank() == 0:
        print(json.dumps({"loss": loss, "ref_loss": ref_loss, "worst_grad_diff": worst, "packed_local": local,
                          "packed_full": full}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
