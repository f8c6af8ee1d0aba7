"""Packing is exact: an example packed with others gets the logits and loss it gets alone."""

import pytest
import torch

from tests.helpers import FIXTURE_ROWS, run, scalars, tiny_config, write_jsonl
from titlegen.data.batching import LengthGroupedBatchSampler
from titlegen.data.encoding import IGNORE_INDEX, collate_train
from titlegen.data.packing import collate_packed
from titlegen.model import backbone as bb
from titlegen.model import lora
from titlegen.model.attention import PACKED_ATTENTION as ATTENTION_NAME
from titlegen.model.attention import packed_forward_kwargs
from titlegen.model.loss import reference_loss, response_loss


def _examples(vocab: int, lengths=((3, 5), (6, 2), (2, 9), (4, 4))):
    g = torch.Generator().manual_seed(7)
    out = []
    for p, r in lengths:
        ids = torch.randint(4, vocab, (p + r,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * p + ids[p:]})
    return out


def test_collate_packed_layout():
    ex = [{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 7], "labels": [-100, 7]}]
    b = collate_packed(ex, pad_id=0, pad_to_multiple_of=8)
    assert b["input_ids"].tolist() == [[1, 5, 6, 1, 7, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, 5, 6, -100, 7, -100, -100, -100]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert b["cu_seq_lens"].tolist() == [0, 3, 5, 8] and int(b["max_length"]) == 3 and int(b["num_tokens"]) == 5


@pytest.fixture(scope="module")
def packed_model(tiny_model_dir):
    cfg = bb.BackboneConfig(name_or_path=str(tiny_model_dir), gradient_checkpointing=False,
                            attn_implementation=ATTENTION_NAME)
    torch.manual_seed(0)
    model = lora.attach_lora(bb.load_base_model(cfg, torch.device("cpu")), lora.LoraSettings(r=4, alpha=8))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def test_packed_logits_and_loss_equal_each_example_alone(packed_model):
    dec = bb.split_decoder(packed_model)
    examples = _examples(packed_model.config.vocab_size)
    batch = collate_packed(examples, pad_id=0, pad_to_multiple_of=8)
    with torch.no_grad():
        hidden = dec.trunk(input_ids=batch["input_ids"], **packed_forward_kwargs(batch))[0]
        packed_logits = dec.head(hidden)[0]
        packed_loss, packed_n = response_loss(hidden, dec.head, batch["labels"], chunk_tokens=5)
        total, count, start = 0.0, 0, 0
        for e in examples:
            ids = torch.tensor([e["input_ids"]])
            alone = packed_model(input_ids=ids).logits[0]
            n = len(e["input_ids"])
            torch.testing.assert_close(packed_logits[start:start + n], alone, rtol=1e-4, atol=1e-4)
            loss, k = reference_loss(alone[None], torch.tensor([e["labels"]]))
            total, count, start = total + float(loss), count + int(k), start + n
    assert int(packed_n) == count
    assert float(packed_loss) == pytest.approx(total, rel=1e-5)


def test_packed_loss_equals_padded_loss_with_gradients(packed_model):
    packed_model.train()
    dec = bb.split_decoder(packed_model)
    examples = _examples(packed_model.config.vocab_size)

    def grads(loss_fn):
        packed_model.zero_grad()
        loss, n = loss_fn()
        (loss / n).backward()
        return float(loss / n), {k: p.grad.clone() for k, p in packed_model.named_parameters() if p.requires_grad}

    padded = collate_train(examples, pad_id=0)
    packed = collate_packed(examples, pad_id=0)
    ref_loss, ref_grads = grads(lambda: reference_loss(
        packed_model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits, padded["labels"]))
    fast_loss, fast_grads = grads(lambda: response_loss(
        dec.trunk(input_ids=packed["input_ids"], **packed_forward_kwargs(packed))[0], dec.head, packed["labels"]))
    packed_model.eval()
    assert fast_loss == pytest.approx(ref_loss, rel=1e-5)
    for k in ref_grads:
        torch.testing.assert_close(fast_grads[k], ref_grads[k], rtol=1e-3, atol=1e-6)


def test_token_budget_batches():
    lengths = [(i * 53) % 300 + 10 for i in range(500)]
    for packed in (True, False):
        sampler = LengthGroupedBatchSampler(lengths, batch_size=8, seed=1, max_tokens=1024, packed=packed)
        batches = sampler.batches()
        assert sorted(i for b in batches for i in b) == list(range(500))
        for b in batches:
            cost = sum(lengths[i] for i in b) if packed else len(b) * max(lengths[i] for i in b)
            assert cost <= 1024
        assert len(sampler) == len(batches)
    alone = LengthGroupedBatchSampler([10, 2000, 20], batch_size=2, max_tokens=1024, packed=True, shuffle=False)
    assert alone.batches() == [[1], [2, 0]]  # too long for the budget: a batch of its own


def test_cli_fit_with_packing(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "trn.json", FIXTURE_ROWS)
    cfg = tiny_config(tmp_path, tiny_model_dir, data, packing=True, max_tokens=96)
    assert run("fit", "--config", str(cfg), "--model.backbone.attn_implementation", ATTENTION_NAME,
               "--trainer.max_steps", "3", "--trainer.val_check_interval", "3") == 0
    losses = scalars(tmp_path / "runs" / "version_0", "train/loss")
    assert sorted(losses) == [0, 1, 2] and all(0 < v < 20 for v in losses.values())


def test_packing_without_the_packed_attention_is_refused(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "trn.json", FIXTURE_ROWS)
    cfg = tiny_config(tmp_path, tiny_model_dir, data, packing=True, max_tokens=96)
    assert run("fit", "--config", str(cfg), "--trainer.max_steps", "1", "--trainer.val_check_interval", "1") == 2
    assert f"data.packing needs model.backbone.attn_implementation: {ATTENTION_NAME}" in capsys.readouterr().err
