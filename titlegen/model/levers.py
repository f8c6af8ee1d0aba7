"""The training-speed options (``model.backbone`` flags) that act on the model once its adapter is attached:
fused QLoRA paths, compiled layer parts, and the training trunk as CUDA graphs."""

from __future__ import annotations

import logging

import torch

from titlegen.errors import TitlegenError
from titlegen.model import fused
from titlegen.model.backbone import BackboneConfig, split_decoder
from titlegen.model.step_graphs import NO_DROPOUT, TrunkGraphs

log = logging.getLogger("titlegen")


def prepare_training(model: torch.nn.Module, cfg: BackboneConfig, fit: bool) -> None:
    """Install the fused paths, and compile the layers' parts for ``fit``."""
    if cfg.fused_lora or cfg.fused_lora_inference:
        fused.install(model, training=cfg.fused_lora, inference=cfg.fused_lora_inference)
        if cfg.fused_lora and fused.with_dropout(model):
            log.warning("model.backbone.fused_lora: the LoRA dropout is above 0, so the adapted projections run "
                        "PEFT's own path (set model.lora.dropout 0 for the fused one)")
    if cfg.compile_layers and fit:
        compile_layers(model)


def compile_layers(model: torch.nn.Module) -> int:
    """Compile the parts of every decoder layer (one compiled graph shared by all layers; token counts vary, so
    shapes are dynamic). Checkpointing stays outside, around the whole layer. A fused MLP in training is left out:
    it runs outside compiled graphs anyway, and a compiled region around it would only add a guard check and a
    graph break to every call. Returns the parts compiled."""
    fused_mlps = not fused.with_dropout(model)  # with dropout the MLP trains on PEFT's path, which compiling fuses
    parts = [child for layer in split_decoder(model).trunk.layers for child in layer.children()
             if not (fused_mlps and getattr(child, "fused_training", False))]
    for part in parts:
        part.compile(dynamic=True)
    return len(parts)


def training_graphs(model: torch.nn.Module, cfg: BackboneConfig, pad_id: int,
                    device: torch.device) -> TrunkGraphs | None:
    """The CUDA graphs of ``model.backbone.training_graphs`` for ``fit``, or None (off, or not on a GPU)."""
    if not cfg.training_graphs:
        return None
    if device.type != "cuda":
        log.warning("model.backbone.training_graphs: CUDA graphs need a GPU; training without them on %s",
                    device.type)
        return None
    if fused.with_dropout(model):
        raise TitlegenError(NO_DROPOUT)
    return TrunkGraphs(split_decoder(model).trunk, pad_id)
