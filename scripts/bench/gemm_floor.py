"""The matmul floor of the prediction benchmark: the bf16 matrix products that 2,000 titles (prompt lengths of the
real distribution) x 64 greedy new tokens need on the dense Llama-3-8B, timed back to back on the GPU with
nothing else in between (no attention, norms, sampling, host). No predict can be faster than this, so it bounds
the titles/s that merged bf16 prediction can reach on this GPU.

  python scripts/bench/gemm_floor.py --lengths .gpu/bench/lengths_chars.json [--rows 2000] [--new-tokens 64]

Two layouts: the model's own (q, k, v, o, gate, up, down as separate weights) and with q/k/v and gate/up
stacked into one weight each (the same arithmetic, fewer and wider products). One JSON line each."""

from __future__ import annotations

import argparse
import json
import statistics

import torch

HIDDEN, INTER, KV, VOCAB, LAYERS = 4096, 14336, 1024, 128256, 32
SEPARATE = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, INTER), (HIDDEN, INTER),
            (INTER, HIDDEN)]  # (in, out) of q, k, v, o, gate, up, down
STACKED = [(HIDDEN, HIDDEN + 2 * KV), (HIDDEN, HIDDEN), (HIDDEN, 2 * INTER), (INTER, HIDDEN)]


def time_products(rows: int, shapes: list[tuple[int, int]], repeat: int = 5) -> float:
    """Seconds for one pass of ``rows`` tokens through ``shapes`` (the median of ``repeat`` timed passes)."""
    weights = [torch.randn(o, i, device="cuda", dtype=torch.bfloat16) for i, o in shapes]
    inputs = {i: torch.randn(rows, i, device="cuda", dtype=torch.bfloat16) for i, _ in shapes}
    outs = [torch.empty(rows, o, device="cuda", dtype=torch.bfloat16) for _, o in shapes]

    def one_pass() -> None:
        for (i, _), w, out in zip(shapes, weights, outs):
            torch.mm(inputs[i], w.t(), out=out)

    for _ in range(3):
        one_pass()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        one_pass()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", required=True)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefill-tokens", type=int, default=32768, help="prompt tokens per prefill forward")
    args = ap.parse_args()
    lengths = json.load(open(args.lengths))
    mean_prompt = statistics.mean(p for p, _ in lengths) + 1  # + BOS
    prompt_tokens = args.rows * mean_prompt
    chunks = prompt_tokens / args.prefill_tokens
    head = time_products(args.rows, [(HIDDEN, VOCAB)])
    for name, shapes in (("separate", SEPARATE), ("stacked", STACKED)):
        decode = time_products(args.rows, shapes) * LAYERS
        prefill = time_products(args.prefill_tokens, shapes) * LAYERS * chunks
        total = prefill + head * args.new_tokens + decode * (args.new_tokens - 1)
        flop = 2 * sum(i * o for i, o in shapes) * LAYERS * (prompt_tokens + args.rows * (args.new_tokens - 1)) \
            + 2 * HIDDEN * VOCAB * args.rows * args.new_tokens
        print(json.dumps({"layout": name, "rows": args.rows, "mean_prompt_tokens": round(mean_prompt, 1),
                          "prefill_s": round(prefill, 3), "decode_step_ms": round((decode + head) * 1e3, 2),
                          "head_ms": round(head * 1e3, 2), "matmul_s": round(total, 3),
                          "tflops": round(flop / total / 1e12, 1),
                          "ceiling_titles_per_s": round(args.rows / total, 1)}), flush=True)


if __name__ == "__main__":
    main()
