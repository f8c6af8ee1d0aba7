"""Where decoding time goes: one generate call of the merged (dense bf16) model, with and without autocast,
timed per step and profiled. For the lent GPU: python scripts/profile_predict.py [--batch 512]."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark import make_checkpoint  # noqa: E402


def main() -> None:
    from titlegen import backbone as bb
    from titlegen.encoding import collate_prompts
    from titlegen.generation import GenerationSettings, generate

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--ckpt", default="/tmp/peer_ckpt/llama3-8b")
    args = ap.parse_args()
    args.ckpt = str(make_checkpoint("llama3-8b", Path(args.ckpt)))
    base = bb.load_base_model(bb.BackboneConfig(name_or_path=args.ckpt, gradient_checkpointing=False),
                              torch.device("cuda"))
    model = bb.merge_into_dense(bb.attach_lora(base, bb.LoraSettings(r=16)), torch.bfloat16).eval()
    tok = bb.load_tokenizer(args.ckpt)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 128000, (int(n),), generator=g).tolist()
               for n in torch.randint(50, 90, (args.batch,), generator=g)]
    batch = {k: v.cuda() for k, v in collate_prompts(prompts, tok.pad_token_id).items()}
    for autocast in (False, True):
        for new in (8, 40):
            s = GenerationSettings(max_new_tokens=new, min_new_tokens=new, no_repeat_ngram_size=0)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                generate(model, tok, batch, s)
                torch.cuda.synchronize()
                t = time.perf_counter()
                generate(model, tok, batch, s)
                torch.cuda.synchronize()
            print(f"autocast={autocast} new={new}: {time.perf_counter() - t:.2f} s", flush=True)
    s = GenerationSettings(max_new_tokens=6, min_new_tokens=6, no_repeat_ngram_size=0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        generate(model, tok, batch, s)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18), flush=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), flush=True)


if __name__ == "__main__":
    main()
