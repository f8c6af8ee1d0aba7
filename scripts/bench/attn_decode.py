"""Decode-attention kernels at the predict benchmark's shapes: one new token per row, grouped-query heads laid out
as query positions, left-padded rows (bool mask). Prints ms per call for each way. GPU only."""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


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


def manual(q, k, v, mask, scale):
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1).to(v.dtype), v)


for B, L in [(2048, 150), (2048, 40), (1024, 150)]:
    q = torch.randn(B, 8, 4, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, 8, L, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lens = torch.randint(L // 3, L, (B,), device="cuda")
    mask = (torch.arange(L, device="cuda")[None] >= (L - lens)[:, None])[:, None, None, :]
    ref = manual(q, k, v, mask, 128 ** -0.5)
    row = {"B": B, "L": L}
    for name, backend in [("efficient", SDPBackend.EFFICIENT_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("math", SDPBackend.MATH), ("flash_nomask", SDPBackend.FLASH_ATTENTION)]:
        m = None if name == "flash_nomask" else mask
        try:
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
                row[name] = round(timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m)), 3)
                if m is not None:
                    row[name + "_err"] = float((out.float() - ref.float()).abs().max())
        except RuntimeError as err:
            row[name] = str(err).splitlines()[0][:60]
    row["manual"] = round(timed(lambda: manual(q, k, v, mask, 128 ** -0.5)), 3)
    print(row, flush=True)

from titlegen.model.decode_kernel import decode_attention  # noqa: E402

for B, L in [(2048, 150), (2048, 40), (1024, 150), (64, 214), (3, 7)]:
    q = torch.randn(B, 8, 4, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, 8, L, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lens = torch.randint(1, L + 1, (B,), device="cuda")
    full = torch.arange(L + 9, device="cuda")[None] >= (L - lens)[:, None]
    mask = full[:, None, None, :L]  # a strided view, as the decoding loop passes
    ref = manual(q, k, v, mask, 128 ** -0.5)
    out = decode_attention(q, k, v, mask, 128 ** -0.5)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        eff = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    print({"B": B, "L": L, "triton_ms": round(timed(lambda: decode_attention(q, k, v, mask, 128 ** -0.5)), 3),
           "efficient_ms": round(timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)), 3),
           "triton_err": float((out.float() - ref.float()).abs().max()),
           "efficient_err": float((eff.float() - ref.float()).abs().max())}, flush=True)
