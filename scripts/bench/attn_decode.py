"""Decode-attention kernels at the predict benchmark's shapes: one new token per row, grouped-query heads laid out
as query positions, left-padded rows (a boolean mask, passed as a strided view as the decoding loop does). Prints,
per shape ("static": the CUDA-graph layout at step 32 of 64, prompts of 50-89 tokens), ms per call of titlegen's
Triton kernel and of each SDPA backend, and each one's largest error against an fp32 reference.
GPU only: python scripts/bench/attn_decode.py"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from titlegen.model.decode_kernel import decode_attention

SCALE = 128 ** -0.5
BACKENDS = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "math": SDPBackend.MATH, "flash_nomask": SDPBackend.FLASH_ATTENTION}  # flash takes no mask: a bound


def timed(fn, n=20):
    for _ in range(3):
        fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    s.record()
    for _ in range(n):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / n


def reference(q, k, v, mask):
    scores = (q.float() @ k.float().transpose(-1, -2)) * SCALE
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v.float()


def inputs(rows: int, length: int):
    q = torch.randn(rows, 8, 4, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(rows, 8, length, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    kept = torch.randint(1, length + 1, (rows,), device="cuda")
    full = torch.arange(length + 9, device="cuda")[None] >= (length - kept)[:, None]
    return q, k, v, full[:, None, None, :length]


def static_inputs(rows: int, prompt: int = 89, new: int = 64, step: int = 32):
    """The decoding loop's CUDA-graph layout: the cache holds ``prompt + new`` columns; each row's prompt (50 to
    ``prompt`` tokens) ends at column ``prompt``, and the columns after the current step are not written yet."""
    q, k, v, _ = inputs(rows, prompt + new)
    lengths = torch.randint(50, prompt + 1, (rows,), device="cuda")
    cols = torch.arange(prompt + new, device="cuda")[None]
    mask = (cols >= (prompt - lengths)[:, None]) & (cols <= prompt + step)
    return q, k, v, mask[:, None, None, :]


def sdpa(backend, mask):
    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=SCALE)
    return run


for rows, length in [(2048, "static"), (2048, 150), (2048, 40), (1024, 150), (64, 214), (3, 7)]:
    q, k, v, mask = static_inputs(rows) if length == "static" else inputs(rows, length)
    ref = reference(q, k, v, mask)
    ways = {"triton": lambda q, k, v: decode_attention(q, k, v, mask, SCALE)}
    ways.update({name: sdpa(b, None if name == "flash_nomask" else mask) for name, b in BACKENDS.items()})
    row = {"rows": rows, "columns": length}
    for name, fn in ways.items():
        try:
            out = fn(q, k, v)
            row[f"{name}_ms"] = round(timed(lambda: fn(q, k, v)), 3)
            if name != "flash_nomask":
                row[f"{name}_err"] = round(float((out.float() - ref).abs().max()), 4)
        except RuntimeError as err:
            row[f"{name}_ms"] = str(err).splitlines()[0][:60]
    print(row, flush=True)
