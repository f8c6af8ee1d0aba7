"""Training throughput of the real titlegen path (DataModule -> LightningModule -> Trainer, via the CLI) on a
random-weight checkpoint of a real architecture, loaded through the normal NF4 path.

Example lengths follow the real AmazonTitles distribution (pairs of prompt/response token counts, e.g.
``.gpu/bench/lengths_chars.json``); token ids are random words of a word-level tokenizer. Prints one JSON line
per variant after warm-up: non-padding tokens/s, padded tokens/s, peak GPU memory, MFU against 6N FLOP per
token (forward, recompute, input-gradient backward; frozen base).

  python scripts/bench/benchmark.py --lengths .gpu/bench/lengths_chars.json --variants fast,recipe [--profile]
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {  # the same shapes (and seed) as the peer benchmark, so both load one checkpoint
    "llama3-8b": dict(arch="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "mistral-7b": dict(arch="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32768, rope_theta=1000000.0,
                       max_position_embeddings=32768, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       sliding_window=None),
    "tiny": dict(arch="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2000, rope_theta=10000.0, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, tie_word_embeddings=False),  # a smoke test of this script on a CPU
    "llama3-1b": dict(arch="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True),
}

PACKED = ["--data.packing", "true", "--model.backbone.attn_implementation", "titlegen_varlen",
          "--trainer.accumulate_grad_batches", "1", "--model.loss_chunk_tokens", "512"]
FAST = PACKED + ["--data.max_tokens", "8192", "--data.max_length", "1024", "--model.backbone.checkpoint_fraction", "1.0"]
LIGER = ["--model.backbone.liger_kernel", "true"]
OFFLOAD = ["--model.backbone.offload_activations", "true"]
COMPILE = ["--model.backbone.compile_layers", "true"]
FUSED = ["--model.backbone.fused_lora", "true"]
CK50 = ["--model.backbone.checkpoint_fraction", "0.5"]
GRAPHS = ["--model.backbone.training_graphs", "true"]
ADAMW = ["--model.optimizer", "torch.optim.AdamW", "--model.optimizer.lr", "2e-4"]  # FSDP2 steps torch's only
RECIPE = PACKED + ["--data.batch_size", "8", "--data.max_length", "2048", "--data.group_by_length", "false"]
# name -> config overrides on top of configs/llama3-8b-qlora.yaml (r=16 all linear, alpha 16, AdamW8bit, lr 2e-4;
# since 2026-12-02 it packs and has fused_lora on: the "-peft" variants switch the fusion off)
UNFUSED = ["--model.backbone.fused_lora", "false"]
VARIANTS = {
    # 8192 tokens per step, examples cut at 1024 tokens: as the strongest TRL peer (trl-packed-bs8, 8 x 1024).
    "fast": FAST,
    "fast-liger": FAST + LIGER,
    "fast-offload": FAST + OFFLOAD,
    "fast-compile": FAST + COMPILE,
    "fast-offload-compile": FAST + OFFLOAD + COMPILE,
    "fast-peft": FAST + UNFUSED,
    "recipe-peft": RECIPE + UNFUSED,
    "fast-fused": FAST + FUSED,
    "fast-fused-offload": FAST + FUSED + OFFLOAD,
    "fast-fused-compile": FAST + FUSED + COMPILE,
    "fast-fused-offload-compile": FAST + FUSED + OFFLOAD + COMPILE,
    "recipe-fused": RECIPE + FUSED,
    "recipe-fused-ck50-offload": RECIPE + FUSED + OFFLOAD + CK50,
    "recipe-fused-ck50-offload-compile": RECIPE + FUSED + OFFLOAD + COMPILE + CK50,
    "fast-16k": PACKED + ["--data.max_tokens", "16384", "--data.max_length", "1024"] + LIGER,
    # The notebook's recipe (same LoRA, same 8-bit AdamW, 8 examples per optimizer step, max length 2048),
    # the 8 examples packed into one row instead of 8 accumulated micro-batches of one.
    "recipe": PACKED + ["--data.batch_size", "8", "--data.max_length", "2048", "--data.group_by_length", "false"],
    "recipe-compile": RECIPE + COMPILE,
    "recipe-graphs": RECIPE + GRAPHS + ["--model.backbone.checkpoint_fraction", "0.25"],
    # the recipe config before training_graphs (2026-12-03): eager, a quarter of the layers recomputed
    "recipe-eager": RECIPE + ["--model.backbone.checkpoint_fraction", "0.25"],
    "recipe-ck50-graphs": RECIPE + GRAPHS + CK50,
    "recipe-ck62-graphs": RECIPE + GRAPHS + ["--model.backbone.checkpoint_fraction", "0.625"],
    "recipe-ck75-graphs": RECIPE + GRAPHS + ["--model.backbone.checkpoint_fraction", "0.75"],
    "recipe-ck100-graphs": RECIPE + GRAPHS + ["--model.backbone.checkpoint_fraction", "1.0"],
    "recipe-ck50-offload-compile": RECIPE + OFFLOAD + COMPILE + CK50,
    # the fast path with its trunk replayed as CUDA graphs (offload and compile recorded too, since 2026-12-03)
    "fast-offload-graphs": FAST + OFFLOAD + GRAPHS,
    "fast-offload-compile-graphs": FAST + OFFLOAD + COMPILE + GRAPHS,
    "fast-compile-graphs": FAST + COMPILE + GRAPHS,
    # the fast path without one lever of 2026-12-03 (sixth session), see PATCHES
    "fast-offload-compile-fullrecompute": FAST + OFFLOAD + COMPILE,
    "fast-offload-compile-eagerelementwise": FAST + OFFLOAD + COMPILE,
    "fast-offload-compile-ckptloss": FAST + OFFLOAD + COMPILE,
    "fast-offload-compile-before": FAST + OFFLOAD + COMPILE,  # all three: the fast path of 2026-12-03
    # the fused MLP's temporaries made 4,096 or 8,192 tokens at a time instead of 2,048 (fewer launches, more memory)
    "fast-offload-compile-chunk4k": FAST + OFFLOAD + COMPILE,
    "fast-offload-compile-chunk8k": FAST + OFFLOAD + COMPILE,
    # FSDP2 (titlegen's adapter_fsdp) on one GPU, against the same path unsharded: per-GPU memory, speed
    "fast-adamw": FAST + ADAMW,
    "fast-fsdp2": FAST + ADAMW + ["--trainer.strategy", "adapter_fsdp"],
    "fast-fsdp2-bf16storage": FAST + ADAMW + ["--trainer.strategy", "adapter_fsdp",
                                              "--model.backbone.quant_storage", "bfloat16"],
    "recipe-liger": PACKED + ["--data.batch_size", "8", "--data.max_length", "2048", "--data.group_by_length", "false"] + LIGER,
    "recipe-nogc": PACKED + ["--data.batch_size", "8", "--data.max_length", "2048", "--data.group_by_length", "false",
                             "--model.backbone.gradient_checkpointing", "false"],
    "padded": ["--data.batch_size", "8", "--data.max_length", "1024", "--trainer.accumulate_grad_batches", "1"],
    "recipe-ck50": PACKED + ["--data.batch_size", "8", "--data.max_length", "2048", "--data.group_by_length", "false",
                             "--model.backbone.checkpoint_fraction", "0.5"],
    "recipe-ck25": PACKED + ["--data.batch_size", "8", "--data.max_length", "2048", "--data.group_by_length", "false",
                             "--model.backbone.checkpoint_fraction", "0.25"],
    # Peak memory at one length: with --fixed-length L and extra flags "--data.max_tokens L --data.max_length L"
    # every step is one example of exactly L tokens.
    "memory": PACKED,
    "config": [],  # the --base-config as it is (e.g. configs/t4-16gb.yaml)
}

# configs/llama3-8b-qlora.yaml turns model.backbone.training_graphs on (2026-12-03): every variant but the recipe
# as configured and the "-graphs" ones measures without it, as before.
for _name, _flags in VARIANTS.items():
    if _name not in ("recipe", "config") and not _name.endswith("-graphs"):
        VARIANTS[_name] = ["--model.backbone.training_graphs", "false", *_flags]  # a new list: some share one


# variant -> [(module, name, value)] set for that variant's run only: the fast path without one of its levers
NO_SKIP = ("titlegen.model.fused", "RESIDUAL_ONLY_MLP", ())  # recomputed MLPs make their discarded output
NO_FUSED_ELEMENTWISE = ("titlegen.model.elementwise", "FUSE_ELEMENTWISE", False)  # eager SwiGLU elementwise
NO_FROZEN_HEAD_LOSS = ("titlegen.model.loss", "FUSED_HEAD", False)  # checkpointed loss chunks
PATCHES = {"fast-offload-compile-fullrecompute": [NO_SKIP],
           "fast-offload-compile-eagerelementwise": [NO_FUSED_ELEMENTWISE],
           "fast-offload-compile-ckptloss": [NO_FROZEN_HEAD_LOSS],
           "fast-offload-compile-before": [NO_SKIP, NO_FUSED_ELEMENTWISE, NO_FROZEN_HEAD_LOSS],
           "fast-offload-compile-chunk4k": [("titlegen.model.fused", "CHUNK_ROWS", 4096)],
           "fast-offload-compile-chunk8k": [("titlegen.model.fused", "CHUNK_ROWS", 8192)]}


def make_checkpoint(shape: str, path: Path) -> Path:
    """Random weights of a real architecture saved like any HF model directory (shared with the peers, which
    load ``path``), and titlegen's view of it: ``path``-titlegen, the same weight files (symlinks) with a
    word-level tokenizer whose words ("t123") never contain a special token. (The peers' tokenizer names its
    special tokens "w0".."w3"; added tokens match inside words, so "w1562" would tokenize as "w1" + unknown.)"""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedTokenizerFast

    spec = dict(SHAPES[shape])
    if not (path / "config.json").is_file():
        arch = spec.pop("arch")
        cfg = (LlamaConfig if arch == "llama" else MistralConfig)(bos_token_id=1, eos_token_id=2, pad_token_id=3,
                                                                  **spec)
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        model.save_pretrained(str(path))
        del model
        torch.cuda.empty_cache()
    view = path.with_name(path.name + "-titlegen")
    view.mkdir(parents=True, exist_ok=True)
    for item in path.iterdir():
        if item.suffix in (".json", ".safetensors") and "token" not in item.name and not (view / item.name).exists():
            (view / item.name).symlink_to(item.resolve())
    if not (view / "tokenizer.json").is_file():
        specials = ["<unk>", "<s>", "</s>", "<pad>"]
        vocab = {**{t: i for i, t in enumerate(specials)}, **{f"t{i}": i for i in range(4, spec["vocab_size"])}}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                pad_token="<pad>").save_pretrained(str(view))
    return view


def make_data(lengths: list, vocab: int, n: int, path: Path, seed: int = 0) -> float:
    """JSON Lines whose title/content have the given token counts; returns the mean example length."""
    rng = random.Random(seed)
    total = 0
    with path.open("w") as fh:
        for i in range(n):
            p, r = rng.choice(lengths)
            title = " ".join(f"t{rng.randrange(10, vocab)}" for _ in range(p))
            content = " ".join(f"t{rng.randrange(10, vocab)}" for _ in range(r))
            fh.write(json.dumps({"uid": str(i), "title": title, "content": content}) + "\n")
            total += p + r + 1  # + EOS
    return total / n


def bench_config(tmp: Path, ckpt: Path, data: Path, args, profile: bool) -> Path:
    clock = {"class_path": "clocks.BenchClock",
             "init_args": {"result_file": str(tmp / "result.json"), "warmup": args.warmup, "profile": profile,
                           "peak_tflops": args.peak_tflops}}
    cfg = {
        "trainer": {"max_steps": args.warmup + args.steps, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "num_sanity_val_steps": 0, "limit_val_batches": 0,
                    "default_root_dir": str(tmp / "run"), "callbacks": [clock]},
        "model": {"backbone": {"name_or_path": str(ckpt)}},
        "data": {"path": str(data), "val_fraction": 0.0, "cache_dir": str(tmp / "cache"), "num_val_samples": 0,
                 "prompt": {"template": "{title}"}, "num_workers": 2},
    }
    path = tmp / "bench.yaml"
    path.write_text(json.dumps(cfg))
    return path


def run_variant(name: str, args, ckpt: Path, data: Path, mean_len: float, tmp: Path) -> dict:
    from titlegen.cli import main

    flags = list(VARIANTS[name])
    cfg = bench_config(tmp, ckpt, data, args, profile=args.profile and name == args.variants.split(",")[0])
    (tmp / "result.json").unlink(missing_ok=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    patches = [(importlib.import_module(m), attr, value) for m, attr, value in PATCHES.get(name, [])]
    saved = [(module, attr, getattr(module, attr)) for module, attr, _ in patches]
    for module, attr, value in patches:
        setattr(module, attr, value)
    try:
        main(["fit", "--config", args.base_config, "--config", str(cfg), *flags, *args.extra])
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)
    result = json.loads((tmp / "result.json").read_text())
    return {"name": f"titlegen-{name}-{args.shape}", **result, "wall_s": round(time.time() - t0, 1),
            **({"flags": " ".join(args.extra)} if args.extra else {})}


def matmul_tflops() -> float:
    """The bf16 matmul rate this GPU reaches (8192^3, median of 10), the MFU reference."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / sorted(times)[5] / 1e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", required=True, help="JSON list of [prompt_tokens, response_tokens]")
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--variants", default="fast,recipe")
    ap.add_argument("--ckpt-dir", default="/tmp/peer_ckpt")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one step (fast variant)")
    ap.add_argument("--out", default=None, help="append the JSON lines here too")
    ap.add_argument("--fixed-length", type=int, default=None,
                    help="every example this many tokens (32 of title, the rest content) instead of --lengths")
    ap.add_argument("--base-config", default="configs/llama3-8b-qlora.yaml", help="the config the variants modify")
    ap.add_argument("--memory-cap-gib", type=float, default=None,
                    help="let this process use at most this much GPU memory (a smaller GPU, on a big one)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="default: measured 8192^3 bf16 matmul rate")
    ap.add_argument("extra", nargs="*", help="more titlegen flags for every variant (after --)")
    args = ap.parse_args()
    sys.argv = sys.argv[:1]  # the CLI runs in-process with its own argument list
    if args.peak_tflops is None:
        args.peak_tflops = round(matmul_tflops(), 1) if torch.cuda.is_available() else 1.0
        print(json.dumps({"matmul_bf16_tflops": args.peak_tflops}), flush=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.memory_cap_gib and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(args.memory_cap_gib * 2**30 / total)
        print(json.dumps({"memory_cap_gib": args.memory_cap_gib}), flush=True)
    ckpt = make_checkpoint(args.shape, Path(args.ckpt_dir) / args.shape)
    lengths = json.load(open(args.lengths))
    if args.fixed_length:
        lengths = [[32, args.fixed_length - 33]]  # + EOS = fixed_length tokens
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        mean_len = make_data(lengths, SHAPES[args.shape]["vocab_size"], 6000, tmp / "bench.jsonl")
        for name in args.variants.split(","):
            try:
                res = run_variant(name, args, ckpt, tmp / "bench.jsonl", mean_len, tmp)
            except Exception as err:  # report and go on with the next variant
                res = {"name": f"titlegen-{name}-{args.shape}", "error": f"{type(err).__name__}: {err}"[:800]}
            gc.collect()  # the run's model and CUDA graph pools, so the next variant's peak is its own
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            print(json.dumps(res), flush=True)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
