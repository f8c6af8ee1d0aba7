"""The pieces of ``model.backbone.training_graphs`` that run on a CPU: the trunk that the graphs record gives the
model's own forward, and the padding to a recorded length changes neither the loss nor any adapter gradient.
(Recording and replaying need a GPU: tests/gpu/test_gpu.py.)"""

from __future__ import annotations

import logging

import pytest
import torch

from tests.helpers import adapted
from titlegen.data.encoding import IGNORE_INDEX
from titlegen.data.packing import collate_packed
from titlegen.errors import TitlegenError
from titlegen.model import backbone as bb
from titlegen.model import fused, levers, lora, step_graphs
from titlegen.model.attention import PACKED_ATTENTION, packed_forward_kwargs
from titlegen.model.loss import response_loss


def _save(kind: str, path) -> str:
    """A 2-layer decoder of ``kind`` with random weights (grouped-query attention), saved as an HF directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(kind, vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                  head_dim=16, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
    return str(path)


def _model(path: str, quantization: str = "nf4", **levers_on) -> torch.nn.Module:
    cfg = bb.BackboneConfig(name_or_path=path, quantization=quantization, attn_implementation=PACKED_ATTENTION,
                            checkpoint_fraction=0.5, fused_lora=True, training_graphs=True, **levers_on)
    model = adapted(cfg, torch.device("cpu"), r=4, alpha=8, std=0.05)
    levers.prepare_training(model, cfg, fit=True)
    return model


def _row(vocab: int, lengths=((5, 9), (3, 14), (7, 6))) -> dict:
    g = torch.Generator().manual_seed(3)
    examples = []
    for p, r in lengths:
        ids = torch.randint(4, vocab, (p + r,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * p + ids[p:]})
    return collate_packed(examples, pad_id=0)


def _loss_and_grads(model, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[float, dict]:
    head = bb.split_decoder(model).head
    loss_sum, count = response_loss(hidden, head, labels, chunk_tokens=8)
    (loss_sum / count).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return float(loss_sum.detach() / count), grads


@pytest.mark.parametrize("kind,levers_on", [("llama", {}), ("mistral", {}), ("qwen2", {}),
                                             ("llama", {"offload_activations": True})],
                         ids=["llama", "mistral", "qwen2", "llama-offload"])
def test_padded_trunk_gives_the_models_loss_and_gradients(kind, levers_on, tmp_path):
    """The trunk the graphs record (the model's own modules called in order), fed the row padded to its bucket
    with one extra segment, gives the model's forward's loss and every adapter gradient (real NF4 weights, fused
    projections, half the layers recomputed without saving RNG state, their inputs offloaded or not)."""
    model = _model(_save(kind, tmp_path), **levers_on)
    batch = _row(model.config.vocab_size)
    decoder = bb.split_decoder(model).trunk
    step_graphs.check_model(decoder)
    ref_loss, ref = _loss_and_grads(model, decoder(input_ids=batch["input_ids"], **packed_forward_kwargs(batch))[0],
                                    batch["labels"])
    length = step_graphs.bucket(batch["input_ids"].shape[1])
    *inputs, labels = step_graphs.pad_row(batch, length, pad_id=0)
    assert inputs[0].shape == labels.shape == (1, length) and inputs[2].tolist()[3:] == [44, 45, 46, 47, length]  # 4 + 4 entries
    loss, got = _loss_and_grads(model, step_graphs.trunk_forward(decoder, *inputs, max_length=length), labels)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert got.keys() == ref.keys() and len(got) == 2 * 7 * 2
    for name in ref:
        assert ref[name].abs().max() > 0, name
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-5 * ref[name].abs().max().item())


def test_bucket_lengths():
    size, spare = step_graphs.BUCKET_TOKENS, step_graphs.SEGMENT_SLOTS
    assert [step_graphs.bucket(n) for n in (1, size - spare, size - spare + 1, 2 * size - spare)] == [
        size, size, 2 * size, 2 * size]
    for segments in range(1, 9):  # boundaries padded to a multiple of 4 entries, every padding segment non-empty
        cu = torch.arange(segments + 1, dtype=torch.int32) * 10
        batch = {"input_ids": torch.ones(1, 10 * segments, dtype=torch.long), "cu_seq_lens": cu,
                 "position_ids": torch.zeros(1, 10 * segments, dtype=torch.long), "labels": torch.zeros(1, 10 * segments)}
        padded = step_graphs.pad_row(batch, step_graphs.bucket(10 * segments), pad_id=0)[2]
        assert padded.numel() % spare == 0 and padded.numel() > cu.numel() and bool((padded.diff() > 0).all())


def test_settings_that_graphs_cannot_replay_stop_with_one_line(tiny_model_dir, tmp_path, caplog):
    bb.BackboneConfig(name_or_path="x", training_graphs=True, offload_activations=True, compile_layers=True)  # fine
    cfg = bb.BackboneConfig(name_or_path=str(tiny_model_dir), training_graphs=True, fused_lora=True)
    model = lora.attach_lora(bb.load_base_model(cfg, torch.device("cpu")), lora.LoraSettings(r=4, dropout=0.1))
    with caplog.at_level(logging.WARNING, logger="titlegen"):
        assert levers.training_graphs(model, cfg, 0, torch.device("cpu")) is None  # a CPU: trains without
    assert "CUDA graphs need a GPU" in caplog.text
    with pytest.raises(TitlegenError, match="model.lora.dropout 0"):
        levers.training_graphs(model, cfg, 0, torch.device("cuda"))
    assert fused.with_dropout(model) > 0
    from transformers import GPT2Config, GPT2Model

    with pytest.raises(TitlegenError, match="not 'gpt2'"):
        step_graphs.check_model(GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10)))


def test_a_step_that_cannot_be_recorded_trains_eagerly_but_out_of_memory_is_raised(tiny_model_dir, monkeypatch,
                                                                                   caplog):
    """A recording error (e.g. an operation a capture does not allow) switches the graphs off with one warning;
    running out of memory while recording goes to the step's own handling (message or model.oom_backoff)."""
    model = _model(str(tiny_model_dir))
    graphs = step_graphs.TrunkGraphs(bb.split_decoder(model).trunk, pad_id=0)

    def fails(error):
        def pair(*args):
            raise error
        return pair

    monkeypatch.setattr(step_graphs, "_GraphPair", fails(torch.OutOfMemoryError("CUDA out of memory")))
    with pytest.raises(torch.OutOfMemoryError):
        graphs._add((256, 4), None, ())
    assert graphs.enabled
    monkeypatch.setattr(step_graphs, "_GraphPair", fails(RuntimeError("operation not permitted when stream is "
                                                                      "capturing\nmore")))
    with caplog.at_level(logging.WARNING, logger="titlegen"):
        assert graphs._add((256, 4), None, ()) is None
    assert not graphs.enabled and graphs.recorded == 0
    assert "cannot be recorded as a CUDA graph (operation not permitted when stream is capturing)" in caplog.text
    batch = _row(model.config.vocab_size)
    hidden, labels = graphs(batch)  # eager from now on: the padded trunk
    assert hidden.shape[:2] == labels.shape == (1, step_graphs.bucket(batch["input_ids"].shape[1]))
