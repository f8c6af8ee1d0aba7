"""LoRA adapters through PEFT: attach, save and reload them in PEFT's own format, switch them off, and find
the plain transformers model inside a PEFT wrapper. The only module that imports ``peft``."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from titlegen.errors import TitlegenError


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter settings (peft).

    Attributes:
        r: Rank of the update matrices.
        alpha: Scaling numerator: the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        dropout: Dropout on the adapter's input.
        target_modules: Module names to adapt, or ``all-linear`` for every linear layer but the output head.
        use_rslora: Rank-stabilised scaling ``alpha / sqrt(r)``.
    """

    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    use_rslora: bool = False


def check_adapter_dir(path: str | Path) -> Path:
    """``path`` as an exported adapter directory, or one clear error."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise TitlegenError(f"{path}: not an adapter directory (expected adapter_config.json)")
    return path


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (or ``model`` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def adapter_off(model: torch.nn.Module, off: bool = True):
    """A context in which the LoRA adapter is switched off (the untuned base), or nothing changes."""
    if not off or not hasattr(model, "disable_adapter"):
        return contextlib.nullcontext()
    return model.disable_adapter()


def attach_lora(model: torch.nn.Module, lora: LoraSettings) -> torch.nn.Module:
    """Freeze the base and wrap it with trainable LoRA adapters (adapter weights stay float32)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_rslora=lora.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def load_adapter(model: torch.nn.Module, adapter_dir: str | Path) -> torch.nn.Module:
    """Wrap ``model`` with the saved PEFT adapter in ``adapter_dir`` (frozen, for inference)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(check_adapter_dir(adapter_dir)), is_trainable=False)


def save_adapter(model: torch.nn.Module, directory: str | Path, state: dict | None = None) -> None:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` (PEFT format) into ``directory``.

    A local base model is recorded by its absolute path, so the adapter loads from any working directory
    (PEFT's ``AutoPeftModelForCausalLM``, ``predict --ckpt_path ADAPTER`` without a config)."""
    model.save_pretrained(str(directory), safe_serialization=True, state_dict=state)  # state: FSDP's, gathered
    config_file = Path(directory) / "adapter_config.json"
    config = json.loads(config_file.read_text())
    base = config.get("base_model_name_or_path")
    if base and Path(base).exists():
        config["base_model_name_or_path"] = str(Path(base).resolve())
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True))


def adapter_base(adapter_dir: str | Path) -> str | None:
    """The base model an exported adapter was trained on, as its ``adapter_config.json`` records it."""
    return json.loads((check_adapter_dir(adapter_dir) / "adapter_config.json").read_text()).get(
        "base_model_name_or_path")


def cast_adapter(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the LoRA tensors (inference only: training keeps them in fp32 for the optimizer)."""
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(dtype)
