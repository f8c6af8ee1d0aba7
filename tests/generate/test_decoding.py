"""titlegen's decoding loop gives the tokens transformers' generate gives: left padding, grouped-query attention,
rows finishing at different steps (and leaving the batch), the repetition rules, NF4 + LoRA."""

import pytest
import torch

from tests.helpers import lora_model
from titlegen.generate import loop as decoding
from titlegen.generate.engines import hf_kwargs, no_repeat_rule
from titlegen.generate.rules import choose_tokens
from titlegen.generate.settings import GenerationSettings


def _model(tiny_model_dir, nf4: bool):
    return lora_model(tiny_model_dir, "nf4" if nf4 else "none")


def _prompts(model, rows: int = 7, seed: int = 0):
    """Left-padded random prompts of different lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 14, (rows,), generator=g).tolist()
    width = max(lengths)
    ids = torch.zeros(rows, width, dtype=torch.long)  # pad id 0
    mask = torch.zeros(rows, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(3, model.config.vocab_size, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask


def _hf(model, ids, mask, settings, eos_id):
    out = model.generate(input_ids=ids, attention_mask=mask, **hf_kwargs(settings, eos_id, 0, ids.shape[1]))
    new = out[:, ids.shape[1]:]
    return torch.nn.functional.pad(new, (0, settings.max_new_tokens - new.shape[1]), value=0)


def _ours(model, ids, mask, settings, eos_id, static: bool = False):
    rule = no_repeat_rule(settings, ids.shape[1])
    return decoding.generate_fast(model, ids, mask, settings, eos_id, 0, rule, static=static)


def _frequent_token(model, ids, mask, settings) -> int:
    """A token the model emits mid-way in some rows: as the EOS id, rows then finish at different steps."""
    free = _hf(model, ids, mask, settings, eos_id=-1)
    counts = torch.bincount(free[:, 2:].flatten(), minlength=model.config.vocab_size)
    counts[0] = 0
    return int(counts.argmax())


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("rules", [dict(), dict(no_repeat_ngram_size=3, repetition_penalty=1.3, min_new_tokens=4)])
def test_greedy_tokens_equal_transformers_generate(tiny_model_dir, monkeypatch, nf4, rules, static):
    """static: the CUDA-graph cache layout (whole cache read, unwritten columns masked), run eagerly here. The
    prefill goes in chunks of rows, each cut to its longest prompt."""
    monkeypatch.setattr(decoding, "CHECK_EVERY", 2)  # check (and drop finished rows) often
    monkeypatch.setattr(decoding, "PREFILL_TOKENS", 24)
    widths = []
    original = decoding._logits
    monkeypatch.setattr(decoding, "_logits", lambda m, ids, *a: widths.append(ids.shape) or original(m, ids, *a))
    model = _model(tiny_model_dir, nf4)
    ids, mask = _prompts(model)
    settings = GenerationSettings(max_new_tokens=24, **{"no_repeat_ngram_size": 0, **rules})
    eos = _frequent_token(model, ids, mask, settings)
    expected = _hf(model, ids, mask, settings, eos)
    stops = [(row == eos).nonzero()[0, 0].item() if (row == eos).any() else None for row in expected]
    assert len({s for s in stops}) >= 3, f"rows should finish at different steps: {stops}"
    assert torch.equal(_ours(model, ids, mask, settings, eos, static), expected)
    chunks = [shape for shape in widths if shape[1] > 1]
    assert len(chunks) >= 3 and sum(rows for rows, _ in chunks) == ids.shape[0], chunks
    assert chunks[0][1] == ids.shape[1] and chunks[-1][1] < ids.shape[1], chunks  # short prompts: fewer columns


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_rows_leave_the_batch(tiny_model_dir, monkeypatch, static):
    monkeypatch.setattr(decoding, "CHECK_EVERY", 1)
    sizes = []
    original = decoding.SlotCache.keep_rows

    def spy(self, rows):
        sizes.append(len(rows))
        original(self, rows)

    monkeypatch.setattr(decoding.SlotCache, "keep_rows", spy)
    model = _model(tiny_model_dir, nf4=False)
    ids, mask = _prompts(model, rows=8, seed=3)
    settings = GenerationSettings(max_new_tokens=24, no_repeat_ngram_size=0)
    eos = _frequent_token(model, ids, mask, settings)
    assert torch.equal(_ours(model, ids, mask, settings, eos, static), _hf(model, ids, mask, settings, eos))
    assert sizes and all(a > b for a, b in zip([8] + sizes, sizes)), sizes


def test_top_k_1_sampling_is_greedy_and_sampling_varies(tiny_model_dir):
    model = _model(tiny_model_dir, nf4=False)
    ids, mask = _prompts(model, rows=4)
    greedy = _ours(model, ids, mask, GenerationSettings(max_new_tokens=10, no_repeat_ngram_size=0), -1)
    top1 = _ours(model, ids, mask, GenerationSettings(max_new_tokens=10, no_repeat_ngram_size=0, do_sample=True,
                                                      top_k=1), -1)
    assert torch.equal(top1, greedy)
    torch.manual_seed(1)
    hot = GenerationSettings(max_new_tokens=10, no_repeat_ngram_size=0, do_sample=True, temperature=5.0, top_p=0.99)
    assert not torch.equal(_ours(model, ids, mask, hot, -1), greedy)


def test_top_p_keeps_the_smallest_head_reaching_the_mass():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    settings = GenerationSettings(do_sample=True, top_p=0.7)
    torch.manual_seed(0)
    draws = {int(choose_tokens(scores, settings)) for _ in range(300)}
    assert draws == {0, 1}


def test_attention_is_restored_after_decoding(tiny_model_dir):
    model = _model(tiny_model_dir, nf4=False)
    before = model.get_base_model().config._attn_implementation
    ids, mask = _prompts(model, rows=2)
    _ours(model, ids, mask, GenerationSettings(max_new_tokens=3), -1)
    assert model.get_base_model().config._attn_implementation == before


def test_a_step_that_cannot_be_recorded_decodes_eagerly(tiny_model_dir, monkeypatch, caplog):
    """If recording the step as a CUDA graph fails (a model that syncs with the host mid-step), decoding goes on
    without graphs, with one warning, and gives the same tokens. Recording itself needs a GPU (tests/gpu); here
    the recorder fails as torch's does, and the graph switch is set as on a GPU."""
    model = _model(tiny_model_dir, nf4=False)
    ids, mask = _prompts(model, rows=5, seed=2)
    settings = GenerationSettings(max_new_tokens=12, no_repeat_ngram_size=0)
    expected = _ours(model, ids, mask, settings, -1, static=True)

    def failing(*args):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    original_init = decoding.DecodeSteps.__init__

    def init_as_on_gpu(self, *args):
        original_init(self, *args)
        self.graphs = True

    monkeypatch.setattr(decoding, "GraphedStep", failing)
    monkeypatch.setattr(decoding.DecodeSteps, "__init__", init_as_on_gpu)
    with caplog.at_level("WARNING", logger="titlegen"):
        got = _ours(model, ids, mask, settings, -1, static=True)
    assert torch.equal(got, expected)
    warnings = [r.getMessage() for r in caplog.records if "cuda_graphs" in r.getMessage()]
    assert len(warnings) == 1 and "stream is capturing" in warnings[0], warnings
