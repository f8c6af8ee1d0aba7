"""The fused QLoRA paths give PEFT's loss and gradients (real NF4 weights on the CPU)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import lora_grads
from titlegen.model import fused, lora


def _run(model_dir, fuse: bool, autocast: bool, dropout: float = 0.0, **backbone):
    loss, grads, model, changed = lora_grads(model_dir, fuse=fuse, autocast=autocast, dropout=dropout, **backbone)
    return loss, grads, changed, model


@pytest.mark.parametrize("autocast,tol", [(False, 2e-5), (True, 3e-2)], ids=["fp32", "bf16-autocast"])
def test_fused_paths_give_peft_gradients(tiny_model_dir, autocast, tol):
    loss, ref, _, _ = _run(tiny_model_dir, fuse=False, autocast=autocast)
    loss_f, got, changed, model = _run(tiny_model_dir, fuse=True, autocast=autocast)
    assert changed == 2 * (1 + 4)  # per layer: the MLP, and q, k, v, o
    layer = model.get_base_model().model.layers[0]
    x = torch.randn(1, 3, layer.mlp.gate_proj.in_features)
    assert "_SwiGLU" in layer.mlp(x).grad_fn.name() and "_Linear" in layer.self_attn.q_proj(x).grad_fn.name()
    assert loss_f == pytest.approx(loss, rel=tol / 10)
    assert ref.keys() == got.keys() and len(got) == 2 * 7 * 2
    for name in ref:
        scale = ref[name].abs().max()
        assert scale > 0, name
        assert (got[name] - ref[name]).abs().max() <= tol * scale, name


def test_fused_with_checkpointing_and_offload(tiny_model_dir, monkeypatch):
    loss, ref, _, _ = _run(tiny_model_dir, fuse=False, autocast=False, gradient_checkpointing=False)
    monkeypatch.setattr(fused, "CHUNK_ROWS", 7)  # 48 tokens: the MLP in 7 chunks, the last one short
    loss_f, got, _, _ = _run(tiny_model_dir, fuse=True, autocast=False, offload_activations=True)
    assert loss_f == pytest.approx(loss, rel=1e-5)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=2e-5 * ref[name].abs().max().item())


def test_chunked_mlp_backward_dequantizes_each_weight_once(tiny_model_dir, monkeypatch):
    """In 7 chunks the MLP's backward still dequantizes each base weight once per layer (gate's and up's
    gradients run over every token at once, over the gradients written into the saved gate and up outputs),
    and gives the one-chunk gradients."""
    _, one_chunk, _, _ = _run(tiny_model_dir, fuse=True, autocast=False, gradient_checkpointing=False)
    dense, calls = fused._dense, {}

    def counting(base, dtype):
        calls[id(base)] = calls.get(id(base), 0) + 1
        return dense(base, dtype)

    monkeypatch.setattr(fused, "_dense", counting)
    monkeypatch.setattr(fused, "CHUNK_ROWS", 7)  # 48 tokens: 7 chunks, the last one short
    _, got, _, model = _run(tiny_model_dir, fuse=True, autocast=False, gradient_checkpointing=False)
    mlps = [layer.mlp for layer in model.get_base_model().model.layers]
    bases = [getattr(mlp, n).base_layer for mlp in mlps for n in ("gate_proj", "up_proj", "down_proj")]
    assert [calls[id(b)] for b in bases] == [2] * len(bases)  # the forward and the backward
    for name in one_chunk:
        torch.testing.assert_close(got[name], one_chunk[name], rtol=1e-5, atol=1e-6 * one_chunk[name].abs().max())


@pytest.mark.parametrize("offload", [False, True], ids=["checkpointing", "offload"])
def test_recomputed_mlp_skips_its_discarded_down_projection(tiny_model_dir, monkeypatch, offload):
    """A recomputed Llama layer's output is discarded, so its fused MLP leaves out the down projection's base
    matmul: the down projection's weight is dequantized once less per layer and step, and every gradient is as
    with the matmul done."""
    dense, down_calls = fused._dense, []

    def counting(base, dtype):
        down_calls.append(base.in_features == 128)  # the down projection: 128 (intermediate) -> 64
        return dense(base, dtype)

    monkeypatch.setattr(fused, "_dense", counting)
    runs, listed = {}, fused.RESIDUAL_ONLY_MLP
    for skip in (False, True):
        monkeypatch.setattr(fused, "RESIDUAL_ONLY_MLP", listed if skip else ())
        down_calls.clear()
        runs[skip] = _run(tiny_model_dir, fuse=True, autocast=False, offload_activations=offload)
        # per layer: forward (the offload's runs without gradients, on PEFT's path here), recomputation, backward
        assert len([c for c in down_calls if c]) / 2 == (2 if offload else 3) - skip, skip
    (loss, ref, _, _), (loss_s, got, _, model) = runs[False], runs[True]
    assert model.get_base_model().model.layers[0].mlp.residual_only
    assert loss_s == loss
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
    assert fused._recomputing == 0


def test_dropout_adapter_off_and_no_grad_take_peft_paths(tiny_model_dir):
    loss, ref, _, _ = _run(tiny_model_dir, fuse=False, autocast=False, dropout=0.3)
    torch.manual_seed(0)
    loss_f, got, _, model = _run(tiny_model_dir, fuse=True, autocast=False, dropout=0.3)
    assert fused.with_dropout(model) == 2 * 7
    mlp = model.get_base_model().model.layers[0].mlp
    x = torch.randn(1, 3, mlp.gate_proj.in_features)
    assert fused.swiglu_mlp(mlp, x) is None  # dropout: PEFT's forward
    model.eval()
    with torch.no_grad():
        # in eval mode without gradients the dropout is the identity: the fused path runs, with PEFT's output
        torch.testing.assert_close(fused.swiglu_mlp(mlp, x), mlp(x), rtol=1e-5, atol=1e-6)
        ids = torch.arange(3, 20)[None]
        with lora.adapter_off(model):
            base = model(input_ids=ids).logits
        adapted = model(input_ids=ids).logits
    assert not torch.equal(base, adapted)  # the adapter switches off and on through the fused modules


def test_fused_inference_gives_peft_logits_and_tokens(tiny_model_dir):
    """fused_lora_inference: without gradients (validation, predict) the fused paths run and give PEFT's logits
    and greedy tokens (NF4 base + a non-zero adapter, fp32 on the CPU); with gradients they stay off."""
    from titlegen.generate.loop import generate_fast
    from titlegen.generate.settings import GenerationSettings

    _, _, model, _ = lora_grads(tiny_model_dir)  # NF4 base, adapter with B non-zero
    model.eval()
    ids = torch.randint(3, 200, (3, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    settings = GenerationSettings(max_new_tokens=12, no_repeat_ngram_size=0)
    with torch.no_grad():
        ref_logits, ref_tokens = model(input_ids=ids).logits, generate_fast(model, ids, mask, settings, -1, 0)
        assert fused.install(model, training=False, inference=True) == 2 * (1 + 4)
        mlp = model.get_base_model().model.layers[0].mlp
        calls = []
        original = fused._SwiGLU.apply
        fused._SwiGLU.apply = lambda *a: calls.append(1) or original(*a)
        try:
            logits, tokens = model(input_ids=ids).logits, generate_fast(model, ids, mask, settings, -1, 0)
        finally:
            fused._SwiGLU.apply = original
    assert calls, "the fused MLP did not run without gradients"
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4 * ref_logits.abs().max().item())
    assert torch.equal(tokens, ref_tokens)
    x = torch.randn(1, 3, mlp.gate_proj.in_features, requires_grad=True)
    assert mlp(x).grad_fn is not None and "_SwiGLU" not in mlp(x).grad_fn.name()  # training: PEFT's path


def test_fused_paths_compute_in_the_autocast_dtype(tiny_model_dir):
    """Under autocast the fused projections run in its dtype, as PEFT's matmuls do, also when the model's own
    dtype is fp32 (the dtype is read before the fused function switches autocast off for its own casts)."""
    _, _, _, model = _run(tiny_model_dir, fuse=True, autocast=False)
    layer = model.get_base_model().model.layers[0]
    x = torch.randn(1, 3, layer.mlp.gate_proj.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn, mlp = layer.self_attn.q_proj(x), layer.mlp(x)
    assert "_Linear" in attn.grad_fn.name() and "_SwiGLU" in mlp.grad_fn.name()
    assert attn.dtype == mlp.dtype == torch.bfloat16
    assert layer.mlp(x).dtype == torch.float32  # without autocast: the model's dtype


def test_compile_layers_leaves_out_the_fused_mlps(tiny_model_dir):
    """The fused MLP runs outside compiled graphs, so compile_layers compiles the attention and norms only;
    with dropout (PEFT's path in training) the MLPs are compiled too."""
    from titlegen.model.levers import compile_layers

    for dropout, per_layer in ((0.0, 3), (0.3, 4)):  # attention, two norms (, MLP)
        _, _, model, _ = lora_grads(tiny_model_dir, fuse=True, dropout=dropout)
        assert compile_layers(model) == 2 * per_layer, dropout


def test_elementwise_parts_are_marked_training_in_the_step_and_its_backward(tiny_model_dir, monkeypatch):
    """The MLP's elementwise parts are compiled (on a GPU) in a training step: its forward, also one without
    gradients (the offload's), and its backward, where autograd turns gradients off; not in eval mode (predict,
    whose decoding graphs must not compile)."""
    seen, real = [], fused.elementwise

    def recording(fn, *tensors, training):
        seen.append((fn.__name__, training, torch.is_grad_enabled()))
        return real(fn, *tensors, training=training)

    monkeypatch.setattr(fused, "elementwise", recording)
    _, _, _, model = _run(tiny_model_dir, fuse=True, autocast=False, offload_activations=True)
    assert {s[:2] for s in seen} == {("silu_mul", True), ("silu_mul_backward_", True)}
    assert ("silu_mul", True, False) in seen and ("silu_mul_backward_", True, False) in seen  # gradients off there
    seen.clear()
    fused.install(model, training=False, inference=True)
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.arange(3, 20)[None])
    assert seen and {s[:2] for s in seen} == {("silu_mul", False)}
