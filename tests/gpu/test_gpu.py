"""GPU-only checks of the fast path (run on the lent H100: pytest -m gpu). They need a random-weight checkpoint
of a real shape, as scripts/benchmark.py makes (default /tmp/peer_ckpt/llama3-8b, or TITLEGEN_GPU_CKPT)."""

import math
import os
import random
from pathlib import Path

import pytest
import torch

from tests.helpers import adapted
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


def _checkpoint() -> Path:
    if not (CKPT / "config.json").is_file():
        pytest.skip(f"{CKPT}: no checkpoint (scripts/bench/benchmark.py makes one)")
    return CKPT


def _train(fast: bool, steps: int = 4, dtype: torch.dtype = torch.bfloat16, same_batch: bool = False,
           lr: float = 2e-4) -> list[float]:
    """Losses of the first ``steps`` optimizer steps; fp16 runs the way Lightning's 16-mixed does (fp16 compute
    dtype, autocast, a gradient scaler)."""
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    cfg = bb.BackboneConfig(name_or_path=str(_checkpoint()), attn_implementation=ATTENTION_NAME, compute_dtype=name)
    model = bb.load_base_model(cfg, torch.device("cuda"))
    torch.manual_seed(3407)
    model = lora.attach_lora(model, lora.LoraSettings(r=16, alpha=16)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    dec, losses = bb.split_decoder(model), []
    for step in range(steps):
        batch = _examples(model.config.vocab_size, 8, seed=0 if same_batch else step)
        with torch.autocast("cuda", dtype=dtype):
            if fast:
                b = {k: v.cuda() for k, v in collate_packed(batch, pad_id=3).items()}
                hidden = dec.trunk(input_ids=b["input_ids"], use_cache=False, **packed_forward_kwargs(b))[0]
                loss, n = response_loss(hidden, dec.head, b["labels"])
            else:
                b = {k: v.cuda() for k, v in collate_train(batch, pad_id=3).items()}
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                loss, n = reference_loss(logits, b["labels"])
        if scaler is None:
            (loss / n).backward()
            opt.step()
        else:
            scaler.scale(loss / n).backward()
            scaler.step(opt)
            scaler.update()
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


def test_fp16_training_follows_bf16_over_20_steps():
    """A T4 has no bfloat16: the fast path in fp16 (16-mixed) must train as in bf16, step for step. A new batch at
    every step, as in training. (On random weights and uniformly random tokens the loss stays near 12.6 for 20
    steps; memorizing one batch instead moves it but is no test of dtypes: Adam's first steps turn the rounding of
    tiny gradients into full-size updates of either sign, and both curves wander off by 3% at step 1.)"""
    bf16 = _train(fast=True, steps=20, dtype=torch.bfloat16, lr=1e-3)
    fp16 = _train(fast=True, steps=20, dtype=torch.float16, lr=1e-3)
    print("bf16", [round(x, 4) for x in bf16], "fp16", [round(x, 4) for x in fp16])
    for a, b in zip(bf16, fp16):
        assert math.isfinite(b) and abs(a - b) / a < 0.02, (bf16, fp16)


def _greedy(dtype: torch.dtype, prompts: list[list[int]], new_tokens: int = 32) -> list[list[int]]:
    """Greedy tokens of the NF4 model with a non-zero adapter and a sharpened head, as dtype_check.py loads it."""
    import sys

    from titlegen.data.encoding import collate_prompts
    from titlegen.generate.loop import generate_fast
    from titlegen.generate.settings import GenerationSettings

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "bench"))
    from dtype_check import load

    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    model = load(_checkpoint(), name)
    batch = {k: v.cuda() for k, v in collate_prompts(prompts, pad_id=3).items()}
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        out = generate_fast(model, batch["input_ids"], batch["attention_mask"],
                            GenerationSettings(max_new_tokens=new_tokens), eos_id=2, pad_id=3)
    del model
    torch.cuda.empty_cache()
    return out.tolist()


def test_fp16_predict_is_at_least_as_close_to_fp32_as_bf16():
    """Greedy tokens of fp16 and bf16 cannot be compared with each other on random weights: their next-token
    distributions have near-ties, and bf16 alone (8 bits of mantissa) already picks another token than fp32 for
    16% of the titles (scripts/bench/dtype_check.py). So each is compared with fp32: fp16 must choose fp32's
    first token for at least 95% of 64 titles, and be no further from fp32 than bf16, which predict uses today."""
    rng = random.Random(1)
    prompts = [[rng.randrange(10, 128000) for _ in range(rng.randint(8, 40))] for _ in range(64)]
    first = {dtype: [row[0] for row in _greedy(dtype, prompts, new_tokens=1)]
             for dtype in (torch.float32, torch.bfloat16, torch.float16)}
    same = {d: sum(a == b for a, b in zip(first[d], first[torch.float32])) / 64 for d in (torch.bfloat16, torch.float16)}
    print(f"first greedy token as fp32's: bf16 {same[torch.bfloat16]:.1%}, fp16 {same[torch.float16]:.1%}")
    assert same[torch.float16] >= 0.95 and same[torch.float16] >= same[torch.bfloat16]


def _save_small_llama(path: Path) -> None:
    """A 4-layer Llama of width 512 with random weights (grouped-query attention, vocabulary 1,000)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(path))


def _small_lora_llama(path: Path) -> torch.nn.Module:
    """The small Llama saved to ``path`` and loaded in NF4 on the GPU, with a LoRA adapter (r=8) whose B matrices
    are non-zero, cast to bf16 as predict casts it; eval mode."""
    _save_small_llama(path)
    cfg = bb.BackboneConfig(name_or_path=str(path), compute_dtype="bfloat16", gradient_checkpointing=False)
    model = lora.attach_lora(bb.load_base_model(cfg, torch.device("cuda")), lora.LoraSettings(r=8)).eval()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    lora.cast_adapter(model, torch.bfloat16)
    return model


def _left_padded_prompts(rows: int, longest: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of 3 to ``longest`` - 1 tokens of the small Llama's vocabulary, left-padded with id 3, on
    the GPU: (ids, mask)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, longest, (rows,), generator=g).tolist()
    ids = torch.full((rows, max(lengths)), 3, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, -n:] = torch.randint(10, 1000, (n,), generator=g)
        mask[i, -n:] = 1
    return ids.cuda(), mask.cuda()


def _lever_grads(model_dir: Path, **backbone) -> tuple[float, dict[str, torch.Tensor]]:
    cfg = bb.BackboneConfig(name_or_path=str(model_dir), compute_dtype="bfloat16",
                            **{k: v for k, v in backbone.items() if k != "fused"})
    torch.manual_seed(0)
    model = lora.attach_lora(bb.load_base_model(cfg, torch.device("cuda")), lora.LoraSettings(r=8, alpha=16)).train()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    if backbone.get("fused"):
        from titlegen.model import fused

        fused.install(model)
    ids = torch.randint(3, 1000, (1, 3000), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


def test_offload_and_fused_projections_on_cuda(tmp_path):
    """The side-stream copies of the offload give checkpointing's loss exactly and its gradients within the
    run-to-run spread of CUDA's backward kernels (attention's backward adds with atomics: two checkpointed runs
    differ too); the fused projections give PEFT's within bf16 rounding (a 4-layer Llama of width 512, NF4,
    3,000 tokens: two 2,048-token MLP chunks)."""
    _save_small_llama(tmp_path)
    loss_ck, ck = _lever_grads(tmp_path)
    _, ck_again = _lever_grads(tmp_path)
    loss_off, off = _lever_grads(tmp_path, offload_activations=True)
    loss_fused, fused = _lever_grads(tmp_path, offload_activations=True, fused=True)
    assert loss_ck == loss_off and loss_fused == pytest.approx(loss_ck, rel=1e-2)

    def worst(grads: dict) -> float:
        return max(float((grads[n] - ck[n]).norm() / ck[n].norm()) for n in ck)

    spread, offload, fusion = worst(ck_again), worst(off), worst(fused)
    print(f"largest relative gradient difference from checkpointing: checkpointing again {spread:.2e}, "
          f"offload {offload:.2e}, fused {fusion:.2e}")
    # the spread moves from run to run: 1.4e-3 or less in one call, 5.6e-3 in the next (offload 5.4e-3 in both, the
    # same with a device sync after every copy), so the floor is bf16 rounding, not the spread of one pair of runs
    assert offload < max(4 * spread, 1e-2) and fusion < 0.05


def test_cuda_graph_decoding_gives_the_eager_tokens(tmp_path, monkeypatch):
    """Decoding steps replayed as CUDA graphs give exactly the tokens of the same static-cache steps run eagerly,
    also when rows finish at different steps and leave the batch (each time, a new graph is recorded); and, on
    these random weights, nearly always those of the dynamic cache (other attention tilings: near-ties flip)."""
    from titlegen.generate import graphs
    from titlegen.generate import loop as decoding
    from titlegen.generate.settings import GenerationSettings

    model = _small_lora_llama(tmp_path)
    ids, mask = _left_padded_prompts(24, 40, seed=2)
    settings = GenerationSettings(max_new_tokens=40, no_repeat_ngram_size=0)
    monkeypatch.setattr(decoding, "CHECK_EVERY", 2)
    monkeypatch.setattr(decoding, "COMPACT_FRACTION", 0.01)  # finished rows leave at every check
    monkeypatch.setattr(decoding, "GRAPH_MIN_STEPS", 1)
    recorded = []
    monkeypatch.setattr(decoding, "GraphedStep", lambda *a: recorded.append(a[1].shape[0]) or graphs.GraphedStep(*a))

    def run(static: bool, eos: int = -1) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return decoding.generate_fast(model, ids, mask, settings, eos, 3, static=static)

    free = run(static=False)
    eos = int(torch.bincount(free[:, 3:].flatten().cpu(), minlength=1000).argmax())  # rows stop mid-way
    dynamic, graphed = run(False, eos), run(True, eos)
    print("steps at which rows stop", [int((r == eos).nonzero()[0]) if (r == eos).any() else None for r in graphed])
    monkeypatch.setattr(decoding, "GRAPH_MIN_STEPS", 10**6)
    eager = run(True, eos)
    print("graphs recorded for batch sizes", recorded)
    assert len(recorded) >= 2 and recorded[0] == 24 and recorded[-1] < 24, recorded
    assert torch.equal(graphed, eager)
    assert (graphed == dynamic).float().mean() > 0.9


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_decode_attention_matches_sdpa(dtype):
    """The decoding step's Triton kernel gives SDPA's output (within the rounding of the output dtype) for
    left-padded rows, a strided mask view and cache lengths that are not a multiple of its 64-column block."""
    import torch.nn.functional as F

    from titlegen.model import decode_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    for rows, kv_heads, groups, d, length in [(3, 2, 4, 64, 7), (64, 8, 4, 128, 214), (512, 8, 4, 128, 150)]:
        q = torch.randn(rows, kv_heads, groups, d, device="cuda", dtype=dtype, generator=g)
        k, v = (torch.randn(rows, kv_heads, length, d, device="cuda", dtype=dtype, generator=g) for _ in range(2))
        kept = torch.randint(1, length + 1, (rows,), device="cuda", generator=g)
        full = torch.arange(length + 5, device="cuda")[None] >= (length - kept)[:, None]
        mask = full[:, None, None, :length]  # a view of a wider mask, as the decoding loop passes
        out = decode_kernel.decode_attention(q, k, v, mask, d ** -0.5)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
        assert out is not None and out.dtype == dtype
        assert (out.float() - ref).abs().max() < 2e-2, (rows, length)


def test_decoding_with_the_triton_kernel_gives_sdpa_tokens(tmp_path, monkeypatch):
    """Greedy decoding of the small Llama (head dim 64) gives the same tokens with the Triton kernel as with
    SDPA on nearly every position (bf16 near-ties may flip), dynamic and static (graph) cache alike."""
    from titlegen.generate import loop as decoding
    from titlegen.generate.settings import GenerationSettings
    from titlegen.model import decode_kernel

    _save_small_llama(tmp_path)
    cfg = bb.BackboneConfig(name_or_path=str(tmp_path), compute_dtype="bfloat16", gradient_checkpointing=False)
    model = lora.attach_lora(bb.load_base_model(cfg, torch.device("cuda")), lora.LoraSettings(r=8)).eval()
    ids, mask = _left_padded_prompts(64, 60, seed=3)
    settings = GenerationSettings(max_new_tokens=32, no_repeat_ngram_size=0)

    def run(static: bool) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return decoding.generate_fast(model, ids, mask, settings, -1, 3, static=static)

    kernel = [run(False), run(True)]
    monkeypatch.setattr(decode_kernel, "enabled", False)
    sdpa = [run(False), run(True)]
    for a, b in zip(kernel, sdpa):
        assert (a == b).float().mean() > 0.95


def _row_of(lengths: list[int], seed: int) -> dict:
    """A packed row (on the GPU) of examples of the given token counts, a fifth of each its prompt."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(10, 1000, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 5) + ids[n // 5:]})
    return {k: v.cuda() for k, v in collate_packed(examples, pad_id=3, pad_to_multiple_of=8).items()}


@pytest.mark.parametrize("levers_on", [{}, {"offload_activations": True},
                                       {"offload_activations": True, "compile_layers": True}],
                         ids=["plain", "offload", "offload-compile"])
def test_training_graphs_give_the_eager_loss_and_gradients(tmp_path, levers_on):
    """The trunk replayed as CUDA graphs gives the loss and adapter gradients of the same padded trunk run
    eagerly, and those of the model's own forward on the unpadded row within bf16 rounding, step after step while
    the weights change in place: a length seen before replays its graph, a longer one starts a new pool, a shorter
    one records into it, and two micro-batches of one length add up (no gradient aliases the recorded buffers).
    Also with the recomputed layers' inputs offloaded (recorded side-stream copies to fixed pinned buffers) and
    with the layers' parts compiled."""
    from titlegen.model import levers, step_graphs

    _save_small_llama(tmp_path)
    cfg = bb.BackboneConfig(name_or_path=str(tmp_path), compute_dtype="bfloat16", attn_implementation=ATTENTION_NAME,
                            checkpoint_fraction=0.5, fused_lora=True, training_graphs=True, **levers_on)
    model = adapted(cfg, torch.device("cuda"), r=8, alpha=16, std=0.02)
    levers.prepare_training(model, cfg, fit=True)
    graphs = levers.training_graphs(model, cfg, 3, torch.device("cuda"))
    dec = bb.split_decoder(model)
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(hidden, labels, zero: bool = True):
        loss_sum, count = response_loss(hidden, dec.head, labels, 512)
        (loss_sum / count).backward()
        grads = [p.grad.float().clone() for p in params]
        if zero:
            model.zero_grad(set_to_none=True)
        return float(loss_sum.detach() / count), grads

    def worst(a, b) -> float:
        return max(float((x - y).norm() / y.norm()) for x, y in zip(a, b))

    # padded lengths (boundary entries): 512 (eager first step), 768 (8): recorded, 768 (8): replayed, 1536 (8):
    # a new pool, 768 (8): recorded again, 768 (4): recorded, 768 (4): replayed
    rows = [[200, 300], [250, 450], [300, 390, 12], [900, 560], [260, 440], [700], [350, 330]]
    for step, lengths in enumerate(rows):
        batch = _row_of(lengths, seed=step)
        length = step_graphs.bucket(batch["input_ids"].shape[1])
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ref_loss, ref = loss_and_grads(dec.trunk(input_ids=batch["input_ids"], **packed_forward_kwargs(batch))[0],
                                           batch["labels"])
            *inputs, labels = step_graphs.pad_row(batch, length, 3)
            eager = [loss_and_grads(step_graphs.trunk_forward(dec.trunk, *inputs, max_length=length), labels)
                     for _ in range(2)]
            loss, got = loss_and_grads(*graphs(batch))
        # attention's backward adds with atomics: two eager runs differ too, by this much
        spread, vs_eager, vs_model = worst(eager[1][1], eager[0][1]), worst(got, eager[0][1]), worst(got, ref)
        print(f"step {step}: {length} tokens, graphs recorded {graphs.recorded}, loss {loss:.5f} (padded eager "
              f"{eager[0][0]:.5f}, model {ref_loss:.5f}), largest relative gradient difference: graphs vs padded eager "
              f"{vs_eager:.1e}, padded eager twice {spread:.1e}, graphs vs model {vs_model:.1e}")
        assert loss == pytest.approx(eager[0][0], rel=1e-3) and loss == pytest.approx(ref_loss, rel=1e-2)
        assert vs_eager < max(4 * spread, 1e-2) and vs_model < 5e-2
        with torch.no_grad():
            for p, g in zip(params, ref):
                p.sub_(0.5 * g.to(p.dtype))  # in place, as the optimizer updates the recorded weights
    assert graphs.recorded == 4 and graphs.longest == 1536 and len(graphs.pairs) == 3
    with torch.autocast("cuda", dtype=torch.bfloat16):  # two micro-batches of one length, gradients accumulated
        first, second = _row_of([300, 400], seed=10), _row_of([250, 420], seed=11)
        _, a = loss_and_grads(*graphs(first))
        _, b = loss_and_grads(*graphs(second))
        loss_and_grads(*graphs(first), zero=False)
        recorded = {g.data_ptr() for pair in graphs.pairs.values() for g in pair.grads}
        assert not any(p.grad.data_ptr() in recorded for p in params)  # .grad is a copy, not a recorded buffer
        _, both = loss_and_grads(*graphs(second))
    # had the first micro-batch's .grad been the recorded buffer, the second replay would have overwritten it
    assert worst(both, [x + y for x, y in zip(a, b)]) < 2e-2
    # an epoch whose plan holds a 3,000-token row: a new pool, sized by a placeholder of that length recorded
    # first; a 1,536-token row then records into it
    graphs.reserve(3000)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_and_grads(*graphs(first))
        assert graphs.longest == 3072 and set(graphs.pairs) == {(3072, 4), (768, 8)}
        loss, got = loss_and_grads(*graphs(_row_of([900, 560], seed=3)))
    assert graphs.recorded == 7 and len(graphs.pairs) == 3
