"""FSDP2 for the 4-bit model: ``--trainer.strategy adapter_fsdp`` (or Lightning's ``ModelParallelStrategy`` with
``tensor_parallel_size`` 1, which cannot resume) shards every decoder layer and the rest of the model over the
data-parallel ranks with PyTorch's ``fully_shard``. FSDP2 shards each parameter on its own, so the packed 4-bit
weights shard in any storage dtype (torch 2.13; before it, not uint8: pytorch#177844); bitsandbytes rebuilds each
gathered weight's 4-bit state from its module (tests/model/test_sharding.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry

from titlegen.errors import TitlegenError
from titlegen.model.backbone import split_decoder


class AdapterFSDP(ModelParallelStrategy):
    """FSDP2 over every device (``--trainer.strategy adapter_fsdp``): Lightning's
    ``ModelParallelStrategy`` with data parallelism only, whose checkpoints hold the adapter and its optimizer
    state whole in one file, gathered from the shards on save and sharded again on resume. (The parent class
    gathers every base weight to rank 0 for a one-file checkpoint, or writes a sharded folder whose loading asks
    for every base weight.)"""

    def __init__(self, data_parallel_size: int | str = "auto", **kwargs) -> None:
        kwargs.update(tensor_parallel_size=1, save_distributed_checkpoint=False)
        super().__init__(data_parallel_size=data_parallel_size, **kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":  # the parent's "auto" is the node count (tensor parallel inside)
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def lightning_module_state_dict(self) -> dict[str, torch.Tensor]:
        return full_adapter_state(self.lightning_module)  # a collective: every rank gathers, rank 0 writes

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        path = Path(self.broadcast(checkpoint_path))
        if path.is_dir():
            raise TitlegenError(f"ckpt_path {path}: a folder (a sharded checkpoint of ModelParallelStrategy); "
                                "adapter_fsdp resumes from its own one-file checkpoints")
        adapter = torch.load(path, map_location="cpu", weights_only=weights_only)["state_dict"]
        check_adapter(self.lightning_module, adapter, path)
        checkpoint = super().load_checkpoint(path, weights_only)  # loads the adapter into the shards, non-strict
        checkpoint["state_dict"] = adapter  # for the module's own load hook, as with any other strategy
        return checkpoint


if "adapter_fsdp" not in StrategyRegistry:  # the name for --trainer.strategy (a class path alone reads as a name)
    StrategyRegistry.register("adapter_fsdp", AdapterFSDP, description="FSDP2 of a QLoRA model (titlegen)")


def check_adapter(module: torch.nn.Module, adapter: dict[str, torch.Tensor], path) -> None:
    """The checkpoint's adapter tensors are the module's trainable weights, names and (whole) shapes."""
    expected = {n: tuple(p.shape) for n, p in module.named_parameters() if p.requires_grad}
    saved = {n: tuple(t.shape) for n, t in adapter.items()}
    if saved != expected:
        wrong = sorted(set(saved.items()) ^ set(expected.items()))[:1]
        raise TitlegenError(f"ckpt_path {path}: its adapter does not match model.lora/model.backbone (first "
                            f"difference: {wrong[0][0]} {wrong[0][1]}); resume with the config it was trained with")


def data_parallel_mesh(trainer) -> object | None:
    """The data-parallel device mesh when the trainer's strategy is Lightning's ModelParallelStrategy, else None."""
    strategy = trainer.strategy
    if not isinstance(strategy, ModelParallelStrategy):
        return None
    mesh = strategy.device_mesh
    if mesh["tensor_parallel"].size() != 1:
        raise TitlegenError("trainer.strategy ModelParallelStrategy: titlegen shards with FSDP only; set "
                            "--trainer.strategy.tensor_parallel_size 1 and data_parallel_size to the device count")
    return mesh["data_parallel"]


def shard_if_asked(trainer, model: torch.nn.Module) -> None:
    """Shard ``model`` when ``trainer`` (None outside a run) runs Lightning's ModelParallelStrategy."""
    mesh = data_parallel_mesh(trainer) if trainer is not None else None
    if mesh is not None:
        shard(model, mesh)


def shard(model: torch.nn.Module, mesh) -> None:
    """Each decoder layer its own FSDP2 unit (gathered for its forward and backward only), then the trunk around
    them (embeddings, final norm), which titlegen's steps call directly. The output head stays whole on every rank:
    the loss reads its weight in chunks outside any module call. Every trainable weight must be in a layer."""
    from torch.distributed.fsdp import fully_shard

    decoder = split_decoder(model)
    outside = [n for n, p in decoder.head.named_parameters() if p.requires_grad]
    if outside:
        raise TitlegenError("FSDP: the output head has trainable weights (model.lora targets it?); titlegen shards "
                            "adapters inside the decoder layers only")
    for layer in decoder.trunk.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(decoder.trunk, mesh=mesh)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP2 holds ``model``'s weights in shards: then every rank must take part in each forward."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def generates_here(module) -> bool:
    """Whether this rank runs a validation generation: rank 0 alone, or every rank when the weights are sharded
    (each sharded forward gathers them from all ranks; rank 0 alone logs the result)."""
    return module.global_rank == 0 or is_sharded(module.model)


def full_adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights whole (a collective: every rank calls it), keyed as in ``model.state_dict()``."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
            for k, v in model.state_dict().items() if "lora_" in k}
