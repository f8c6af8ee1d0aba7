"""Generation pieces: the vectorized no-repeat-ngram rule, and the dequantize-and-merge inference path."""

import pytest
import torch

from tests.helpers import lora_model
from titlegen.generate.rules import NoRepeatNGram
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


def test_first_hour_03_no_repeat_ngram_lets_the_description_repeat_the_title():
    """A title trigram ("Crème Brûlée Torch") may be copied; a trigram the model already generated may not."""
    from titlegen.generate.settings import GenerationSettings

    creme, brulee, torch_, a, b = 5, 6, 7, 8, 9
    prompt = [1, creme, brulee, torch_, 2]
    n = GenerationSettings().no_repeat_ngram_size  # the default setting
    rule = NoRepeatNGram(n, start=len(prompt))
    scores = torch.zeros(1, 12)
    copying = torch.tensor([prompt + [creme, brulee]])
    assert torch.isfinite(rule(copying, scores.clone())[0, torch_])  # "Crème Brûlée Torch" again: allowed
    looping = torch.tensor([prompt + [a, b, creme, a, b]])
    assert rule(looping, scores.clone())[0, creme] == float("-inf")  # its own "a b crème" again: banned
    # transformers' rule bans the title's trigram: the reason titles came out misspelt.
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    assert NoRepeatNGramLogitsProcessor(n)(copying, scores.clone())[0, torch_] == float("-inf")
    # Both engines (titlegen's loop and transformers' generate) get the rule with the prompt's width.
    from titlegen.generate.engines import hf_kwargs, no_repeat_rule

    assert no_repeat_rule(GenerationSettings(), 17).start == 17
    [hf_rule] = hf_kwargs(GenerationSettings(), 2, 0, 17)["logits_processor"]
    assert hf_rule.start == 17
