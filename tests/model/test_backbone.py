"""The real 4-bit path on CPU: NF4 loading, LoRA, the bitsandbytes gradient trap, adapter round trip, the loss."""

import pytest
import torch

from titlegen.data.encoding import IGNORE_INDEX
from titlegen.errors import TitlegenError
from titlegen.model import backbone as bb
from titlegen.model import lora
from titlegen.model.loss import reference_loss, response_loss

CPU = torch.device("cpu")


def _model(path, fix=True, **kw):
    cfg = bb.BackboneConfig(name_or_path=str(path), gradient_checkpointing=False, **kw)
    base = bb.load_base_model(cfg, CPU)
    if not fix:  # undo the workaround, to show the trap is real on this CPU
        for m in base.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = True
    torch.manual_seed(0)
    model = lora.attach_lora(base, lora.LoraSettings(r=4, alpha=8, dropout=0.0))
    for name, p in model.named_parameters():  # non-zero B so the adapter changes the output
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model.train()


def _batch(vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    labels[1, 9:] = IGNORE_INDEX
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _lora_grads(model, batch):
    model.zero_grad()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss, n = reference_loss(out.logits, batch["labels"])
    (loss / n).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def test_nf4_layers_and_trainable_lora_only(tiny_model_dir):
    import bitsandbytes as bnb

    model = _model(tiny_model_dir)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 14  # 7 projections x 2 layers
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def _grads_then_eval_pass(model, batch) -> dict:
    """LoRA gradients, then what Lightning's sanity check and validation do: an eval-mode no-grad forward."""
    before = _lora_grads(model, batch)
    model.eval()
    with torch.no_grad():
        model(input_ids=batch["input_ids"])
    model.train()
    return before


def _repacked(model) -> bool:
    return any(hasattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu")
               for m in model.modules())


def test_eval_forward_does_not_corrupt_later_gradients(tiny_model_dir):
    """NOTES.md: on AVX512-BF16 CPUs an eval no-grad forward repacks 4-bit weights and later backwards drop
    gradients silently. With the workaround, gradients after an eval pass equal those before it."""
    model = _model(tiny_model_dir)
    batch = _batch(model.config.vocab_size)
    before = _grads_then_eval_pass(model, batch)
    after = _lora_grads(model, batch)
    for name in before:
        assert before[name].abs().sum() > 0
        torch.testing.assert_close(after[name], before[name])
    assert not _repacked(model)


def test_the_trap_exists_without_the_workaround(tiny_model_dir):
    model = _model(tiny_model_dir, fix=False)
    batch = _batch(model.config.vocab_size)
    before = _grads_then_eval_pass(model, batch)
    if not _repacked(model):
        pytest.skip("this CPU lacks AVX512-BF16: bitsandbytes never repacks here")
    with pytest.warns(UserWarning):
        after = _lora_grads(model, batch)
    assert any(not torch.allclose(after[k], before[k]) for k in before)


@pytest.mark.parametrize("fused_head", [True, False], ids=["frozen-head-loss", "checkpointed-chunks"])
def test_fast_loss_equals_reference_loss_and_gradients(tiny_model_dir, monkeypatch, fused_head):
    from titlegen.model import loss as loss_module

    monkeypatch.setattr(loss_module, "FUSED_HEAD", fused_head)
    model = _model(tiny_model_dir)
    batch = _batch(model.config.vocab_size)
    ref_grads = _lora_grads(model, batch)
    ref_loss, ref_n = reference_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                     batch["labels"])
    model.zero_grad()
    dec = bb.split_decoder(model)
    hidden = dec.trunk(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    loss, n = response_loss(hidden, dec.head, batch["labels"], chunk_tokens=3)  # several chunks
    assert ("FrozenHeadLoss" in loss.grad_fn.name()) == fused_head
    (loss / n).backward()
    assert int(n) == int(ref_n) == 7 + 4  # response positions 5-11 and 5-8
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for k, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref_grads[k], rtol=1e-4, atol=1e-6)


def test_adapter_round_trip_through_plain_peft(tiny_model_dir, tmp_path):
    from peft import PeftModel

    model = _model(tiny_model_dir).eval()
    ids = _batch(model.config.vocab_size)["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    lora.save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    base = bb.load_base_model(bb.BackboneConfig(name_or_path=str(tiny_model_dir), gradient_checkpointing=False), CPU)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)


def test_missing_model_directory_is_one_clear_line(tmp_path):
    with pytest.raises(TitlegenError, match="no model here"):
        bb.check_model_path(str(tmp_path / "nothing"))
    with pytest.raises(TitlegenError, match="fetch_quickstart_model"):
        bb.check_model_path("checkpoints/base/SmolLM2-135M-Instruct-missing")
    bb.check_model_path("meta-llama/Meta-Llama-3-8B")  # a Hub name is left to transformers


def test_checkpoint_fraction_keeps_recomputation_on_the_first_layers(tiny_model_dir):
    from transformers.modeling_layers import GradientCheckpointingLayer

    cfg = bb.BackboneConfig(name_or_path=str(tiny_model_dir), quantization="none", checkpoint_fraction=0.5)
    model = bb.load_base_model(cfg, torch.device("cpu"))
    flags = [m.gradient_checkpointing for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert flags == [True, False]


def _model_with_its_own_code(tiny_model_dir, tmp_path):
    import json
    import shutil

    directory = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, directory)
    (directory / "configuration_tiny.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass TinyConfig(LlamaConfig):\n    model_type = 'tiny_custom'\n")
    (directory / "modeling_tiny.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_tiny import TinyConfig\n\n\n"
        "class TinyForCausalLM(LlamaForCausalLM):\n    config_class = TinyConfig\n")
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type="tiny_custom", architectures=["TinyForCausalLM"], auto_map={
        "AutoConfig": "configuration_tiny.TinyConfig", "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"})
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_a_model_that_ships_code_runs_it_only_with_trust_remote_code(tiny_model_dir, tmp_path):
    directory = _model_with_its_own_code(tiny_model_dir, tmp_path)
    with pytest.raises(TitlegenError, match="ships its own Python code.*model.backbone.trust_remote_code"):
        bb.load_base_model(bb.BackboneConfig(name_or_path=str(directory), gradient_checkpointing=False), CPU)
    trusted = bb.BackboneConfig(name_or_path=str(directory), gradient_checkpointing=False, trust_remote_code=True)
    assert type(bb.load_base_model(trusted, CPU)).__name__ == "TinyForCausalLM"


@pytest.mark.parametrize("fuse", [False, True], ids=["peft", "fused"])
def test_4bit_weights_stored_as_bfloat16_give_the_same_training(tiny_model_dir, fuse):
    """model.backbone.quant_storage (what FSDP of 4-bit weights needs): the packed bits live in a bfloat16 tensor,
    and the loss and every adapter gradient are those of uint8 storage, on PEFT's path and the fused one."""
    from tests.helpers import lora_grads

    loss, grads, _, _ = lora_grads(tiny_model_dir, fuse=fuse)
    loss_bf16, grads_bf16, model, _ = lora_grads(tiny_model_dir, fuse=fuse, quant_storage="bfloat16")
    weight = model.get_base_model().model.layers[0].mlp.gate_proj.base_layer.weight
    assert weight.dtype == torch.bfloat16 and getattr(weight, "quant_state", None) is not None
    assert loss_bf16 == loss
    for name in grads:
        assert torch.equal(grads_bf16[name], grads[name]), name
