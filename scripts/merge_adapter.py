"""Merge an exported titlegen adapter into its base and write a standard Hugging Face model directory.

The base is loaded as training saw it (4-bit NF4 by default), dequantized, and each LoRA update is added in
float32 before rounding to bf16, so the merged model computes what the 4-bit model + adapter computed. (Merging
into 4-bit weights and re-quantizing would lose most of the adapter, peft#2321.) ``--quantization none`` merges
into the original bf16 weights instead.

  python scripts/merge_adapter.py --adapter checkpoints/quickstart/version_0/adapter --out merged/
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from titlegen.errors import TitlegenError
from titlegen.io import copy_if_present, staged_dir
from titlegen.model import backbone as bb
from titlegen.model import lora
from titlegen.model.merge import merge_into_dense


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", required=True, help="an exported adapter directory")
    ap.add_argument("--out", required=True, help="where the merged model directory goes (new or empty)")
    ap.add_argument("--overwrite", action="store_true", help="replace --out even if it is not empty")
    ap.add_argument("--base", default=None, help="base model directory (default: the adapter's own base)")
    ap.add_argument("--quantization", default="nf4", choices=["nf4", "fp4", "none"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    return ap.parse_args(argv)


def merge(args: argparse.Namespace) -> Path:
    adapter, out = lora.check_adapter_dir(args.adapter), Path(args.out)
    if out.resolve() in (Path.cwd().resolve(), adapter.resolve(), *adapter.resolve().parents):
        raise TitlegenError(f"{out}: --out must be a new directory, not the current one or one holding the adapter")
    base = args.base or json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = bb.BackboneConfig(name_or_path=base, quantization=args.quantization, gradient_checkpointing=False,
                            compute_dtype=args.dtype if device.type == "cuda" else "float32")
    bb.check_model_path(base)  # arguments first, the model after
    with staged_dir(out, replace=args.overwrite) as staged:
        dtype = getattr(torch, args.dtype)
        model = merge_into_dense(lora.load_adapter(bb.load_base_model(cfg, device), adapter), dtype=dtype)
        for param in model.parameters():  # norms and embeddings too: config.json then tells the truth
            param.data = param.data.to(dtype)
        model.config.dtype = dtype
        model.save_pretrained(str(staged), safe_serialization=True)
        bb.load_tokenizer(base).save_pretrained(str(staged))
        for extra in ("prompt.yaml", "config.yaml"):
            copy_if_present(adapter / extra, staged)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        out = merge(args)
    except TitlegenError as err:
        print(f"merge_adapter: error: {err}", file=sys.stderr)
        return 2
    print(f"merged model: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
