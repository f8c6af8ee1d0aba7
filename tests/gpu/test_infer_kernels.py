"""GPU-only checks of the decoding loop's Triton kernels (titlegen/model/infer_kernels.py) against the model code
they replace: each kernel's output, then greedy tokens with and without them (pytest -m gpu)."""

import pytest
import torch
import torch.nn.functional as F

from tests.gpu.test_gpu import _left_padded_prompts, _save_small_llama, _small_lora_llama
from titlegen.model import infer_kernels

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def _close(out: torch.Tensor | None, ref: torch.Tensor) -> float:
    """Share of elements equal to the model code's. Asserts every other one is within two rounding steps: the
    kernel and the model's code both round an intermediate (the normalized row, silu) to the dtype before the last
    product, so one step there can become two in the result."""
    assert out is not None and out.dtype == ref.dtype and out.shape == ref.shape
    eps = torch.finfo(ref.dtype).eps
    diff = (out.float() - ref.float()).abs()
    worst = (diff / (eps * ref.float().abs() + 1e-6)).max().item()
    share = (out == ref).float().mean().item()
    print(f"{tuple(ref.shape)} {ref.dtype}: {share:.4%} equal, largest difference {worst:.2f} rounding steps")
    assert worst <= 2
    return share


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_kernels_give_the_model_code_outputs(dtype):
    """RMSNorm (widths of Llama's hidden states, of a head, and one not a power of two) and the SwiGLU's
    silu(gate) * up within two rounding steps of transformers' code and nearly always equal; the rotary embedding
    (on the strided (B, heads, T, D) views the attention passes, at prefill and decoding shapes, positions per row
    or shared) as close to the exact rotation as transformers' code (_rotation_close)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

    g = torch.Generator(device="cuda").manual_seed(0)
    for width, rows in [(4096, (3, 7)), (128, (2049,)), (1000, (5,))]:
        norm = LlamaRMSNorm(width, eps=1e-5).to("cuda", dtype)
        norm.weight.copy_(1 + 0.1 * torch.randn(width, device="cuda", generator=g))
        x = 3 * torch.randn(*rows, width, device="cuda", generator=g).to(dtype)
        assert _close(infer_kernels.rms_norm(x, norm.weight, norm.variance_epsilon), norm(x)) > 0.99
    e, u = (3 * torch.randn(1000, 1536, device="cuda", generator=g).to(dtype) for _ in range(2))
    assert _close(infer_kernels.silu_mul(e, u), F.silu(e) * u) > 0.999
    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0)
    rope = LlamaRotaryEmbedding(config).to("cuda")
    for batch, tokens in [(3, 37), (64, 1)]:
        q = torch.randn(batch, tokens, 32, 128, device="cuda", generator=g).to(dtype).transpose(1, 2)
        k = torch.randn(batch, tokens, 8, 128, device="cuda", generator=g).to(dtype).transpose(1, 2)
        positions = torch.arange(tokens, device="cuda")[None] + torch.randint(0, 200, (batch, 1), device="cuda")
        cos, sin = rope(q, positions)
        ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
        _rotation_close(infer_kernels.rotary(q, cos, sin), q, cos, sin, ref_q)
        _rotation_close(infer_kernels.rotary(k, cos, sin), k, cos, sin, ref_k)
    shared = torch.arange(37, device="cuda")[None]  # one row of positions for every row, as a plain forward has
    cos, sin = rope(q, shared)
    q = torch.randn(3, 37, 32, 128, device="cuda", generator=g).to(dtype).transpose(1, 2)
    _rotation_close(infer_kernels.rotary(q, cos, sin), q, cos, sin, apply_rotary_pos_emb(q, q, cos, sin)[0])


def _rotation_close(out: torch.Tensor | None, x, cos, sin, ref: torch.Tensor) -> None:
    """The rotary embedding against the exact rotation of its (rounded) inputs, in float64: within one rounding
    step of the size of its two terms (where they nearly cancel, a last bit is a large share of the result), and
    on average no further from it than transformers' code, which rounds both products before their sum."""
    assert out is not None and out.dtype == ref.dtype and out.shape == ref.shape
    half = x.shape[-1] // 2
    x64, c, s = x.double(), cos.double().unsqueeze(1), sin.double().unsqueeze(1)
    turned = torch.cat((-x64[..., half:], x64[..., :half]), dim=-1)
    exact, scale = x64 * c + turned * s, (x64 * c).abs() + (turned * s).abs()
    ours, theirs = (out.double() - exact).abs(), (ref.double() - exact).abs()
    print(f"{tuple(ref.shape)} {ref.dtype}: {(out == ref).double().mean():.2%} equal to transformers'; mean error "
          f"against the exact rotation {ours.mean():.3e} (transformers' {theirs.mean():.3e})")
    assert (ours <= torch.finfo(ref.dtype).eps * scale + 1e-30).all()
    assert ours.mean() <= 1.01 * theirs.mean()


def _counting(monkeypatch) -> dict:
    """Wrap each kernel's entry point: the returned dict gets, per kernel, the set of "it ran" outcomes seen."""
    used = {}
    for name in ("rms_norm", "rotary", "silu_mul"):
        kernel = getattr(infer_kernels, name)
        monkeypatch.setattr(infer_kernels, name, lambda *a, _k=kernel, _n=name: used.setdefault(_n, set()).add(
            (out := _k(*a)) is not None) or out)
    return used


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_kernels_keep_the_model_as_close_to_float32_as_its_own_code(tmp_path, monkeypatch, dtype):
    """Greedy tokens of random weights cannot be compared between two roundings (near-ties flip, and a row then
    goes its own way), so the whole small Llama's next-token logits at every prompt position are compared with
    the float32 model's: with the kernels they are no further from float32 than with the model's own code."""
    from transformers import LlamaForCausalLM

    _save_small_llama(tmp_path)
    exact = LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).cuda().eval()
    model = LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=dtype).cuda().eval()
    ids = torch.randint(10, 1000, (64, 48), device="cuda", generator=torch.Generator("cuda").manual_seed(5))
    mask = torch.ones_like(ids)  # no padding: a padded position's attention has no key at all
    keep = mask.bool()
    truth = exact(input_ids=ids, attention_mask=mask).logits[keep]
    plain = model(input_ids=ids, attention_mask=mask).logits[keep].float()
    used = _counting(monkeypatch)
    with infer_kernels.switched_on(model):
        fast = model(input_ids=ids, attention_mask=mask).logits[keep].float()
    assert used == {"rms_norm": {True}, "rotary": {True}, "silu_mul": {True}}, used
    error = {name: (x - truth).abs().mean().item() for name, x in (("model code", plain), ("kernels", fast))}
    top = {name: (x.argmax(-1) == truth.argmax(-1)).float().mean().item() for name, x in (("model code", plain),
                                                                                           ("kernels", fast))}
    print(f"{dtype} against float32 over {len(truth)} positions: mean |logit error| {error}, top-1 agreement {top}")
    assert error["kernels"] <= 1.1 * error["model code"] and top["kernels"] >= top["model code"] - 0.01


def test_decoding_with_the_kernels_replays_and_restores(tmp_path, monkeypatch):
    """Greedy decoding of the small Llama, NF4 + LoRA and then merged into dense bf16 weights, with the kernels:
    every kernel runs, the recorded CUDA graphs give exactly the tokens of the same steps run eagerly, the tokens
    follow the model's own code (most positions; bf16 near-ties flip), and the model's code is back afterwards."""
    from transformers.models.llama import modeling_llama

    from titlegen.generate import loop as decoding
    from titlegen.generate.settings import GenerationSettings
    from titlegen.model.merge import merge_into_dense

    model = _small_lora_llama(tmp_path)
    ids, mask = _left_padded_prompts(64, 60, seed=4)
    settings = GenerationSettings(max_new_tokens=32, no_repeat_ngram_size=0)
    used, rope = _counting(monkeypatch), modeling_llama.apply_rotary_pos_emb

    def run(static: bool, graphs: bool = True) -> torch.Tensor:
        monkeypatch.setattr(decoding, "GRAPH_MIN_STEPS", 4 if graphs else 10**6)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return decoding.generate_fast(model, ids, mask, settings, -1, 3, static=static)

    for merged in (False, True):
        if merged:
            model = merge_into_dense(model, torch.bfloat16).eval()
        monkeypatch.setattr(infer_kernels, "enabled", True)
        graphed, eager = run(True), run(True, graphs=False)
        assert used == {"rms_norm": {True}, "rotary": {True}, "silu_mul": {True}}, used
        assert torch.equal(graphed, eager)
        monkeypatch.setattr(infer_kernels, "enabled", False)
        same = (graphed == run(True)).float().mean().item()
        print(f"{'merged' if merged else 'NF4 + LoRA'}: tokens as the model code's {same:.1%}")
        assert same > 0.8
        used.clear()
    assert modeling_llama.apply_rotary_pos_emb is rope
    assert not any("forward" in vars(m) for m in model.modules())
