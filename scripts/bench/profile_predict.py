"""Where decoding time goes: titlegen's decoding loop on the random Llama-3-8B checkpoint, NF4 + a LoRA adapter
(or the merged dense model), timed and profiled (host time vs. GPU time per step, top kernels and host ops).
For the lent GPU: python scripts/bench/profile_predict.py [--batch 1024] [--merged]."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from benchmark import make_checkpoint  # the script's own folder is on sys.path


def main() -> None:
    from titlegen.data.encoding import collate_prompts
    from titlegen.generate.engines import generate
    from titlegen.generate.settings import GenerationSettings
    from titlegen.model import backbone as bb
    from titlegen.model import fused, lora
    from titlegen.model.merge import merge_into_dense

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--merged", action="store_true")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs for the decoding steps")
    ap.add_argument("--fused", action="store_true", help="model.backbone.fused_lora_inference (NF4 + adapter)")
    ap.add_argument("--prompt-len", type=int, default=0, help="every prompt this long (default: 50-89 tokens); "
                    "short prompts leave the decode steps alone in the profile")
    ap.add_argument("--ckpt", default="/tmp/peer_ckpt/llama3-8b")
    args = ap.parse_args()
    ckpt = str(make_checkpoint("llama3-8b", Path(args.ckpt)))
    base = bb.load_base_model(bb.BackboneConfig(name_or_path=ckpt, gradient_checkpointing=False), torch.device("cuda"))
    model = lora.attach_lora(base, lora.LoraSettings(r=16)).eval()
    lora.cast_adapter(model, torch.bfloat16)  # as predict does on a GPU
    if args.fused:
        fused.install(model, training=False, inference=True)
    if args.merged:
        model = merge_into_dense(model, torch.bfloat16).eval()
    tok = bb.load_tokenizer(ckpt)
    g = torch.Generator().manual_seed(0)
    sizes = [args.prompt_len] * args.batch if args.prompt_len else torch.randint(50, 90, (args.batch,), generator=g)
    prompts = [torch.randint(10, 128000, (int(n),), generator=g).tolist() for n in sizes]
    batch = {k: v.cuda() for k, v in collate_prompts(prompts, tok.pad_token_id).items()}

    def run(new: int) -> float:
        s = GenerationSettings(max_new_tokens=new, min_new_tokens=new, no_repeat_ngram_size=0,
                               cuda_graphs=not args.eager)
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            generate(model, tok, batch, s)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run(4)
    t1, t2 = run(1), run(33)
    print(f"batch {args.batch} {'merged' if args.merged else 'nf4+lora'}{' fused' if args.fused else ''} {'eager' if args.eager else 'graphs'}: prefill+1 {t1:.2f} s, "
          f"decode {(t2 - t1) / 32 * 1e3:.1f} ms/step", flush=True)
    for label, new in (("the prefill (+ one token)", 1), ("the prefill + 8 decoding steps", 9)):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            run(new)
        events = prof.key_averages()
        print(f"== {label}", flush=True)
        print(events.table(sort_by="self_cuda_time_total", row_limit=16 if new > 1 else 12), flush=True)
        if new > 1:
            print(events.table(sort_by="self_cpu_time_total", row_limit=8), flush=True)


if __name__ == "__main__":
    main()
