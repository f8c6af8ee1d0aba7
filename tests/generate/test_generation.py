"""Generation pieces: the vectorized no-repeat-ngram rule, and the dequantize-and-merge inference path."""

import pytest
import torch

from tests.helpers import lora_model
from titlegen.generate.rules import NoRepeatNGram
from titlegen.model import backbone as bb
from titlegen.model import lora
from titlegen.model.merge import merge_into_dense


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_equals_transformers(n):
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    g = torch.Generator().manual_seed(n)
    for _ in range(100):
        length = int(torch.randint(1, 40, (1,), generator=g))
        ids = torch.randint(0, 12, (6, length), generator=g)
        scores = torch.randn(6, 12, generator=g)
        expected = NoRepeatNGramLogitsProcessor(n)(ids, scores.clone())
        assert torch.equal(NoRepeatNGram(n)(ids, scores.clone()), expected)


def test_merged_dense_model_computes_what_nf4_plus_adapter_computes(tiny_model_dir):
    import bitsandbytes as bnb

    model = lora_model(tiny_model_dir)
    ids = torch.randint(4, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        dense = merge_into_dense(model)
        got = dense(input_ids=ids).logits
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in dense.modules())
    assert not any("lora" in n for n, _ in dense.named_modules())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_merge_script_writes_a_plain_transformers_model(tiny_model_dir, tmp_path):
    import sys

    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(tiny_model_dir.parents[0]))
    from scripts.merge_adapter import main as merge_main

    model = lora_model(tiny_model_dir)
    lora.save_adapter(model, tmp_path / "adapter")
    bb.load_tokenizer(str(tiny_model_dir)).save_pretrained(str(tmp_path / "adapter"))
    ids = torch.randint(4, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert merge_main(["--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"),
                       "--dtype", "float32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    assert getattr(merged.config, "quantization_config", None) is None
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert merge_main(["--adapter", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
