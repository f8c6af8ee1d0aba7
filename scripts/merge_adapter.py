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
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    from titlegen.model import backbone as bb
    from titlegen.errors import TitlegenError

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", required=True, help="an exported adapter directory")
    ap.add_argument("--out", required=True, help="where the merged model directory goes")
    ap.add_argument("--base", default=None, help="base model directory (default: the adapter's own base)")
    ap.add_argument("--quantization", default="nf4", choices=["nf4", "fp4", "none"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args(argv)
    try:
        adapter = Path(args.adapter)
        config = adapter / "adapter_config.json"
        if not config.is_file():
            raise TitlegenError(f"{adapter}: not an adapter directory (expected adapter_config.json)")
        base = args.base or json.loads(config.read_text())["base_model_name_or_path"]
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        cfg = bb.BackboneConfig(name_or_path=base, quantization=args.quantization, gradient_checkpointing=False,
                                compute_dtype=args.dtype if device.type == "cuda" else "float32")
        model = bb.merge_into_dense(bb.load_adapter(bb.load_base_model(cfg, device), adapter),
                                    dtype=getattr(torch, args.dtype))
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".merge-") as tmp:
            staged = Path(tmp) / "model"
            model.save_pretrained(str(staged), safe_serialization=True)
            bb.load_tokenizer(base).save_pretrained(str(staged))
            for extra in ("prompt.yaml", "config.yaml"):
                if (adapter / extra).is_file():
                    shutil.copy(adapter / extra, staged / extra)
            shutil.rmtree(out, ignore_errors=True)
            staged.rename(out)
    except TitlegenError as err:
        print(f"merge_adapter: error: {err}", file=sys.stderr)
        return 2
    print(f"merged model: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
