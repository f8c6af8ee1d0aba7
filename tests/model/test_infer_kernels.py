"""The decoding loop's kernel switch (titlegen/model/infer_kernels.py) on a CPU: forced on, it routes the norms,
the rotary embedding and the SwiGLU MLPs through the kernels' entry points, which decline off a GPU, so the tokens
are the model's own; afterwards every module is as it was. The kernels themselves: tests/gpu."""

from collections import Counter

import torch

from tests.helpers import lora_model
from titlegen.generate import loop as decoding
from titlegen.generate.settings import GenerationSettings
from titlegen.model import infer_kernels


def test_the_switch_routes_every_part_and_puts_the_model_back(tiny_model_dir, monkeypatch):
    from transformers.models.llama import modeling_llama

    model = lora_model(tiny_model_dir, "none")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (5, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = mask[3, :2] = 0
    settings = GenerationSettings(max_new_tokens=6, no_repeat_ngram_size=0)
    plain = decoding.generate_fast(model, ids, mask, settings, -1, 0)
    assert not infer_kernels.applies_to(model)  # no GPU here: the loop leaves the model alone

    calls, rope = Counter(), modeling_llama.apply_rotary_pos_emb
    for name in ("rms_norm", "rotary", "silu_mul"):
        kernel = getattr(infer_kernels, name)
        monkeypatch.setattr(infer_kernels, name, lambda *a, _k=kernel, _n=name: calls.update([_n]) or _k(*a))
    monkeypatch.setattr(infer_kernels, "applies_to", lambda m: True)
    switched = decoding.generate_fast(model, ids, mask, settings, -1, 0)

    assert torch.equal(switched, plain)
    forwards = 6  # one prefill chunk + 5 decoding steps; per forward 2 layers x 2 norms + the final norm
    assert calls == {"rms_norm": forwards * 5, "rotary": forwards * 2 * 2, "silu_mul": forwards * 2}, calls
    assert modeling_llama.apply_rotary_pos_emb is rope
    assert not any("forward" in vars(m) for m in model.modules())
