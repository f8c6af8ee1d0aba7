"""Prediction throughput of ``titlegen predict`` on a random-weight checkpoint of a real architecture in NF4 with
a non-zero LoRA adapter (r=16, all linear layers), titles of the real prompt-length distribution, a fixed number
of new tokens per title (EOS suppressed: random weights never stop), greedy. One JSON line per variant.

  python scripts/bench/benchmark_predict.py --lengths .gpu/bench/lengths_chars.json --titles 2000 --variants nf4,merged
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchmark import SHAPES, make_checkpoint  # the script's own folder is on sys.path

VARIANTS = {
    "nf4": ["--model.merge_for_predict", "false"],
    "merged": ["--model.merge_for_predict", "true"],
    "merged-ngram3": ["--model.merge_for_predict", "true", "--model.generation.no_repeat_ngram_size", "3"],
    # before the CUDA graphs of the decoding step (2026-12-02)
    "nf4-eager": ["--model.merge_for_predict", "false", "--model.generation.cuda_graphs", "false"],
    "merged-eager": ["--model.merge_for_predict", "true", "--model.generation.cuda_graphs", "false"],
    # PEFT's own LoRA forward instead of the fused projections (model.backbone.fused_lora_inference, the default)
    "nf4-peft": ["--model.merge_for_predict", "false", "--model.backbone.fused_lora_inference", "false"],
    # before 2026-12-03: CUDA graphs for batches of up to 1,024 rows only (module constants, PATCHES)
    "nf4-graphs1k": ["--model.merge_for_predict", "false"],
    "merged-graphs1k": ["--model.merge_for_predict", "true"],
    # before the eighth session (2026-12-03): the model's own RMSNorm, rotary embedding and SwiGLU code
    "nf4-plain": ["--model.merge_for_predict", "false"],
    "merged-plain": ["--model.merge_for_predict", "true"],
}
PATCHES = {  # module attributes set for one variant: (module, attribute) -> value
    "nf4-graphs1k": {("titlegen.generate.loop", "GRAPH_MAX_ROWS"): 1024},
    "merged-graphs1k": {("titlegen.generate.loop", "GRAPH_MAX_ROWS"): 1024},
    "nf4-plain": {("titlegen.model.infer_kernels", "enabled"): False},
    "merged-plain": {("titlegen.model.infer_kernels", "enabled"): False},
}


def make_adapter(ckpt: Path, target: Path) -> None:
    """A LoRA adapter with random non-zero weights, exported like titlegen's own (adapter + prompt + tokenizer)."""
    from titlegen.data.prompts import PromptTemplate, save_prompt
    from titlegen.model import backbone as bb
    from titlegen.model import lora

    if (target / "adapter_config.json").is_file():
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = bb.load_base_model(bb.BackboneConfig(name_or_path=str(ckpt), gradient_checkpointing=False), device)
    torch.manual_seed(0)
    model = lora.attach_lora(base, lora.LoraSettings(r=16, alpha=16))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    lora.save_adapter(model, target)
    save_prompt(PromptTemplate(template="{title}"), target)
    bb.load_tokenizer(str(ckpt)).save_pretrained(str(target))
    del model, base
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def make_titles(lengths: list, vocab: int, n: int, path: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "title"])
        for i in range(n):
            p, _ = rng.choice(lengths)
            writer.writerow([i, " ".join(f"t{rng.randrange(10, vocab)}" for _ in range(p))])


def run_variant(name: str, args, ckpt: Path, adapter: Path, titles: Path, tmp: Path, tag: str = "") -> dict:
    import importlib

    from titlegen.cli import main

    clock = {"class_path": "clocks.PredictClock", "init_args": {"result_file": str(tmp / "r.json")}}
    cfg = {"trainer": {"callbacks": [clock], "enable_progress_bar": False},
           "model": {"backbone": {"name_or_path": str(ckpt)},
                     "generation": {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens,
                                    "no_repeat_ngram_size": 0}},
           "data": {"eval_batch_size": args.batch, "cache_dir": str(tmp / "cache")}}
    (tmp / "p.yaml").write_text(json.dumps(cfg))
    out = tmp / f"{name}{tag}.csv"
    t0 = time.time()
    patches = {(importlib.import_module(m), attr): v for (m, attr), v in PATCHES.get(name, {}).items()}
    saved = {key: getattr(*key) for key in patches}
    for (module, attr), value in patches.items():
        setattr(module, attr, value)
    try:
        main(["predict", "--config", "configs/llama3-8b-qlora.yaml", "--config", str(tmp / "p.yaml"), *VARIANTS[name],
              "--ckpt_path", str(adapter), "--data.predict_path", str(titles), "--output", str(out), *args.extra])
    finally:
        for (module, attr), value in saved.items():
            setattr(module, attr, value)
    rows = sum(1 for _ in csv.DictReader(out.open()))
    result = json.loads((tmp / "r.json").read_text())
    return {"name": f"titlegen-predict-{name}", "batch": args.batch, **result, "rows_in_csv": rows,
            "wall_s_with_load": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", required=True)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--titles", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--variants", default="nf4,merged")
    ap.add_argument("--warmup-titles", type=int, default=256,
                    help="predict this many titles with the first variant first, untimed: the first predict in a "
                         "process also pays CUDA's lazy kernel loading and cuBLAS set-up")
    ap.add_argument("--ckpt-dir", default="/tmp/peer_ckpt")
    ap.add_argument("extra", nargs="*", help="more titlegen flags for every variant")
    args = ap.parse_args()
    sys.argv = sys.argv[:1]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ckpt = make_checkpoint(args.shape, Path(args.ckpt_dir) / args.shape)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        make_adapter(ckpt, tmp / "adapter")
        make_titles(json.load(open(args.lengths)), SHAPES[args.shape]["vocab_size"], args.titles, tmp / "t.csv")
        if args.warmup_titles:
            make_titles(json.load(open(args.lengths)), SHAPES[args.shape]["vocab_size"], args.warmup_titles,
                        tmp / "w.csv", seed=1)
            run_variant(args.variants.split(",")[0], args, ckpt, tmp / "adapter", tmp / "w.csv", tmp, "-warmup")
        for name in args.variants.split(","):
            try:
                res = run_variant(name, args, ckpt, tmp / "adapter", tmp / "t.csv", tmp)
            except Exception as err:
                res = {"name": f"titlegen-predict-{name}", "error": f"{type(err).__name__}: {err}"[:800]}
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
