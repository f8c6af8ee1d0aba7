"""scripts/merge_adapter.py: a plain transformers model that computes what NF4 + adapter computed, whose
config.json states its real dtype, and an --out that never deletes what the user had there."""

import json
import os
import runpy
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.helpers import lora_model
from titlegen.model import backbone as bb
from titlegen.model import lora

merge_main = runpy.run_path(str(Path(__file__).resolve().parents[2] / "scripts" / "merge_adapter.py"))["main"]


def _adapter(tiny_model_dir, tmp_path):
    model = lora_model(tiny_model_dir)
    lora.save_adapter(model, tmp_path / "adapter")
    bb.load_tokenizer(str(tiny_model_dir)).save_pretrained(str(tmp_path / "adapter"))
    return model, tmp_path / "adapter"


def test_merge_script_writes_a_plain_transformers_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model, adapter = _adapter(tiny_model_dir, tmp_path)
    ids = torch.randint(4, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert merge_main(["--adapter", str(adapter), "--out", str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    assert getattr(merged.config, "quantization_config", None) is None
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert merge_main(["--adapter", str(tmp_path), "--out", str(tmp_path / "x")]) == 2


def test_first_hour_10_adapter_and_merged_model_are_portable(tiny_model_dir, tmp_path):
    _, adapter = _adapter(tiny_model_dir, tmp_path)
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert os.path.isabs(base) and Path(base).samefile(tiny_model_dir)  # loads from any working directory
    assert merge_main(["--adapter", str(adapter), "--out", str(tmp_path / "bf16")]) == 0
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    tensors = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert config["dtype"] == "bfloat16" and {t.dtype for t in tensors.values()} == {torch.bfloat16}


def test_first_hour_01_merge_never_deletes_a_non_empty_out(tiny_model_dir, tmp_path, capsys):
    _, adapter = _adapter(tiny_model_dir, tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert merge_main(["--adapter", str(adapter), "--out", str(mine)]) == 2
    assert (mine / "notes.txt").read_text() == "keep me" and "--overwrite" in capsys.readouterr().err
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        assert merge_main(["--adapter", str(adapter), "--out", ".", "--overwrite"]) == 2  # never the cwd
    finally:
        os.chdir(cwd)
    assert (mine / "notes.txt").is_file() and adapter.is_dir()
    assert merge_main(["--adapter", str(adapter), "--out", str(mine), "--overwrite"]) == 0
    assert (mine / "config.json").is_file() and not (mine / "notes.txt").exists()
