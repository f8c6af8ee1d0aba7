"""How far bf16 and fp16 predictions are from fp32 on the GPU, and whether titlegen's decoding loop gives the greedy
tokens of transformers' ``generate`` in each dtype: one JSON line per dtype.

A random-weight Llama-3-8B in NF4 with a non-zero LoRA adapter (the head scaled up so next-token distributions
are peaked, as a trained model's are, instead of nearly flat), 64 random prompts:

  python scripts/bench/dtype_check.py [--ckpt-dir /tmp/peer_ckpt] [--new-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import make_checkpoint  # noqa: E402

from titlegen.data.encoding import collate_prompts  # noqa: E402
from titlegen.generate.loop import generate_fast  # noqa: E402
from titlegen.generate.settings import GenerationSettings  # noqa: E402
from titlegen.model import backbone as bb  # noqa: E402
from titlegen.model import lora  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load(ckpt: Path, name: str) -> torch.nn.Module:
    """NF4 base in the ``name`` compute dtype, a seeded non-zero adapter cast to it, and a sharpened head: random
    weights give nearly flat next-token distributions, where any rounding flips the argmax; a trained model's are
    peaked."""
    cfg = bb.BackboneConfig(name_or_path=str(ckpt), compute_dtype=name, gradient_checkpointing=False)
    model = bb.load_base_model(cfg, torch.device("cuda"))
    torch.manual_seed(0)
    model = lora.attach_lora(model, lora.LoraSettings(r=16, alpha=16)).eval()
    for pname, p in model.named_parameters():
        if "lora_B" in pname:
            torch.nn.init.normal_(p, std=0.01)
    with torch.no_grad():
        bb.split_decoder(model).head.weight.mul_(12)
    lora.cast_adapter(model, DTYPES[name])  # as predict does on a GPU
    return model


@torch.no_grad()
def run(model: torch.nn.Module, name: str, batch: dict, new_tokens: int) -> dict:
    dtype = DTYPES[name]
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -1].float()
        ours = generate_fast(model, batch["input_ids"], batch["attention_mask"],
                             GenerationSettings(max_new_tokens=new_tokens), eos_id=2, pad_id=3)
        hf = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=False,
                            max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=2, pad_token_id=3,
                            temperature=None, top_p=None, top_k=None)[:, batch["input_ids"].shape[1]:]
    return {"logits": logits, "ours": ours.tolist(), "hf": hf.tolist(), "finite": bool(logits.isfinite().all())}


def agree(a: list[list[int]], b: list[list[int]]) -> dict:
    rows = sum(x == y for x, y in zip(a, b)) / len(a)
    tokens = sum(p == q for x, y in zip(a, b) for p, q in zip(x, y)) / sum(map(len, a))
    first = sum(x[0] == y[0] for x, y in zip(a, b)) / len(a)
    return {"same_rows": round(rows, 3), "same_tokens": round(tokens, 3), "same_first": round(first, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt-dir", default="/tmp/peer_ckpt")
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()
    ckpt = make_checkpoint("llama3-8b", Path(args.ckpt_dir) / "llama3-8b")
    rng = random.Random(1)
    prompts = [[rng.randrange(10, 128000) for _ in range(rng.randint(8, 40))] for _ in range(64)]
    batch = {k: v.cuda() for k, v in collate_prompts(prompts, pad_id=3).items()}
    results = {}
    for name in DTYPES:
        model = load(ckpt, name)
        results[name] = run(model, name, batch, args.new_tokens)
        del model
        torch.cuda.empty_cache()
    ref = results["float32"]
    for name, res in results.items():
        err = float((res["logits"] - ref["logits"]).norm() / ref["logits"].norm())
        top1 = float((res["logits"].argmax(-1) == ref["logits"].argmax(-1)).float().mean())
        print(json.dumps({"dtype": name, "finite": res["finite"], "logit_rel_err_vs_fp32": round(err, 4),
                          "top1_vs_fp32": round(top1, 3), "ours_vs_hf_same_dtype": agree(res["ours"], res["hf"]),
                          "ours_vs_fp32_ours": agree(res["ours"], ref["ours"])}), flush=True)


if __name__ == "__main__":
    main()
