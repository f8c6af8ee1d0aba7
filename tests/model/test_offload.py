"""Activation offload gives the gradients of ordinary checkpointing (CPU: the same code path, minus the copy)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import lora_grads
from titlegen.errors import TitlegenError
from titlegen.model import backbone as bb
from titlegen.model.offload import ActivationStore, offloaded_checkpoint


def _grads(model_dir, autocast: bool, **backbone) -> tuple[float, dict[str, torch.Tensor]]:
    loss, grads, _, _ = lora_grads(model_dir, autocast=autocast, dropout=0.2, **backbone)  # dropout: RNG replay
    return loss, grads


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_offloaded_layers_give_the_gradients_of_checkpointing(tiny_model_dir, autocast):
    loss, plain = _grads(tiny_model_dir, autocast, gradient_checkpointing=False)
    loss_ck, ck = _grads(tiny_model_dir, autocast, gradient_checkpointing=True)
    loss_off, off = _grads(tiny_model_dir, autocast, gradient_checkpointing=True, offload_activations=True)
    assert loss == loss_ck == loss_off
    assert plain.keys() == off.keys() and len(off) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    for name in plain:
        assert off[name].abs().sum() > 0, name  # the first layer's adapter too (its input needs no gradient)
        torch.testing.assert_close(off[name], ck[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(off[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_offload_covers_only_the_recomputed_layers(tiny_model_dir):
    from transformers.modeling_layers import GradientCheckpointingLayer

    cfg = bb.BackboneConfig(name_or_path=str(tiny_model_dir), quantization="none", checkpoint_fraction=0.5,
                            offload_activations=True)
    model = bb.load_base_model(cfg, torch.device("cpu"))
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    store = bb.split_decoder(model).trunk.activation_store
    assert layers[0]._gradient_checkpointing_func.func is offloaded_checkpoint and store.count == 1
    assert layers[0]._gradient_checkpointing_func.args == (store, layers[0], 0)
    assert not layers[1].gradient_checkpointing


def test_offload_without_checkpointing_is_one_line():
    with pytest.raises(TitlegenError, match="offload_activations: needs model.backbone.gradient_checkpointing"):
        bb.BackboneConfig(name_or_path="x", gradient_checkpointing=False, offload_activations=True)


def test_only_the_hidden_states_may_need_gradients():
    with pytest.raises(ValueError, match="only the first argument"):
        offloaded_checkpoint(ActivationStore(1), torch.nn.Linear(2, 2), 0, lambda h, w: h * w, torch.ones(2),
                             torch.ones(2, requires_grad=True))
