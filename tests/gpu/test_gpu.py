"""GPU-only checks of the fast path (run on the lent H100: pytest -m gpu). They need a random-weight checkpoint
of a real shape, as scripts/benchmark.py makes (default /tmp/peer_ckpt/llama3-8b, or TITLEGEN_GPU_CKPT)."""

import os
import random
from pathlib import Path

import pytest
import torch

from titlegen.data.encoding import IGNORE_INDEX, collate_train
from titlegen.data.packing import collate_packed
from titlegen.model import backbone as bb
from titlegen.model import lora
from titlegen.model.attention import PACKED_ATTENTION as ATTENTION_NAME
from titlegen.model.attention import _loop_varlen, packed_forward_kwargs, varlen_attention_forward
from titlegen.model.loss import reference_loss, response_loss

pytestmark = pytest.mark.gpu
CKPT = Path(os.environ.get("TITLEGEN_GPU_CKPT", "/tmp/peer_ckpt/llama3-8b"))


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def test_varlen_kernel_matches_per_example_attention():
    torch.manual_seed(0)
    lengths = [37, 512, 5, 300, 170]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device="cuda")
    q = torch.randn(1, 32, sum(lengths), 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, sum(lengths), 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    module = torch.nn.Module()
    fast, _ = varlen_attention_forward(module, q, k, v, None, scaling=128**-0.5, cu_seq_lens_q=cu,
                                       max_length_q=max(lengths))
    exact = _loop_varlen(*(t[0].transpose(0, 1).float() for t in (q, k, v)), cu, 128**-0.5)
    err = (fast[0].float() - exact).norm() / exact.norm()
    assert err < 1e-2, float(err)


def _examples(vocab: int, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p, r = rng.randint(20, 90), rng.randint(10, 400)
        ids = [rng.randrange(10, vocab) for _ in range(p + r)] + [2]
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * p + ids[p:]})
    return out


def _train(fast: bool, steps: int = 4) -> list[float]:
    if not (CKPT / "config.json").is_file():
        pytest.skip(f"{CKPT}: no checkpoint (scripts/benchmark.py makes one)")
    cfg = bb.BackboneConfig(name_or_path=str(CKPT), attn_implementation=ATTENTION_NAME)
    model = bb.load_base_model(cfg, torch.device("cuda"))
    torch.manual_seed(3407)
    model = lora.attach_lora(model, lora.LoraSettings(r=16, alpha=16)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    dec, losses = bb.split_decoder(model), []
    for step in range(steps):
        batch = _examples(model.config.vocab_size, 8, seed=step)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if fast:
                b = {k: v.cuda() for k, v in collate_packed(batch, pad_id=3).items()}
                hidden = dec.trunk(input_ids=b["input_ids"], use_cache=False, **packed_forward_kwargs(b))[0]
                loss, n = response_loss(hidden, dec.head, b["labels"])
            else:
                b = {k: v.cuda() for k, v in collate_train(batch, pad_id=3).items()}
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                loss, n = reference_loss(logits, b["labels"])
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss / n))
    del model, opt
    torch.cuda.empty_cache()
    return losses


def test_fast_and_plain_paths_agree_over_the_first_steps():
    plain, fast = _train(fast=False), _train(fast=True)
    print("plain", plain, "fast", fast)
    for a, b in zip(plain, fast):
        assert abs(a - b) / a < 0.01, (plain, fast)
