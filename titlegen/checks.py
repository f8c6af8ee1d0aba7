"""Arguments checked before anything heavy is loaded: each problem is one line naming the flag or file.

LightningCLI would otherwise report a bad value deep in a 50-line traceback (jsonargparse folds the message into
a union-type error), or only after minutes of model loading and generation.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml

from titlegen.data.prompts import PromptTemplate
from titlegen.errors import TitlegenError
from titlegen.generate.settings import GenerationSettings
from titlegen.model.backbone import BackboneConfig
from titlegen.model.step_graphs import NO_DROPOUT

# Settings dataclasses whose own checks (__post_init__) run on the parsed values, by config key.
SETTINGS = {("data", "prompt"): PromptTemplate, ("model", "generation"): GenerationSettings,
            ("model", "backbone"): BackboneConfig}


def check_settings(cfg, subcommand: str = "fit") -> None:
    """Build each settings dataclass from the parsed configuration once, so its checks speak first."""
    for (group, key), cls in SETTINGS.items():
        value = cfg.get(group, {}).get(key) if hasattr(cfg.get(group, {}), "get") else None
        if value is not None:
            cls(**(value.as_dict() if hasattr(value, "as_dict") else dict(value)))
    check_backoff(cfg)
    check_sharding(cfg)
    check_fsdp2(cfg, subcommand)
    check_graphs(cfg)


def check_graphs(cfg) -> None:
    """``model.backbone.training_graphs`` replays packed rows without dropout: say so before the model loads."""
    model, data = cfg.get("model") or {}, cfg.get("data") or {}
    if not (model.get("backbone") or {}).get("training_graphs"):
        return
    if not data.get("packing"):
        raise TitlegenError("model.backbone.training_graphs: needs data.packing true (it replays packed rows)")
    if (model.get("lora") or {}).get("dropout", 0.0):
        raise TitlegenError(NO_DROPOUT)


def check_sharding(cfg) -> None:
    """FSDP with 4-bit weights needs them stored in the parameter dtype (bnb_4bit_quant_storage); titlegen keeps
    them as uint8, which FSDP cannot shard with the adapter: say so before minutes of loading, not after."""
    strategy = str((cfg.get("trainer") or {}).get("strategy") or "")
    quantization = ((cfg.get("model") or {}).get("backbone") or {}).get("quantization", "nf4")
    if "fsdp" in strategy.lower() and not _adapter_fsdp(strategy) and quantization != "none":
        raise TitlegenError(f"trainer.strategy {strategy} with model.backbone.quantization {quantization}: FSDP of "
                            "4-bit weights runs through --trainer.strategy adapter_fsdp "
                            "(FSDP2; README: Several GPUs), or use --trainer.strategy ddp")


def check_fsdp2(cfg, subcommand: str = "fit") -> None:
    """What FSDP2 (``ModelParallelStrategy``) does not run yet, said before loading: commands other than fit
    (their ranks take different batches, while a sharded forward needs every rank), bitsandbytes optimizers (they
    cannot step sharded weights), the step levers not tested with it, and resuming from Lightning's own
    ModelParallelStrategy (titlegen's adapter_fsdp writes checkpoints that resume)."""
    strategy = str((cfg.get("trainer") or {}).get("strategy") or "")
    if "ModelParallelStrategy" not in strategy and not _adapter_fsdp(strategy):
        return
    prefix = f"trainer.strategy {'adapter_fsdp' if _adapter_fsdp(strategy) else 'ModelParallelStrategy'} (FSDP2)"
    if subcommand != "fit":
        raise TitlegenError(f"{prefix}: shards fit only; run {subcommand} on one device or with --trainer.strategy "
                            "ddp")
    model = cfg.get("model") or {}
    backbone = model.get("backbone") or {}
    optimizer = model.get("optimizer")
    optimizer = str(optimizer.get("class_path", "") if hasattr(optimizer, "get") else optimizer or "")
    untested = [flag for flag in ("offload_activations", "compile_layers", "training_graphs") if backbone.get(flag)]
    if optimizer.startswith("bitsandbytes"):
        raise TitlegenError(f"{prefix}: {optimizer} cannot step sharded weights; use --model.optimizer "
                            "torch.optim.AdamW")
    if untested:
        raise TitlegenError(f"{prefix}: not tested with model.backbone.{untested[0]} yet; set it false")
    if backbone.get("quant_storage", "uint8") == "uint8" and _torch_version() < (2, 13):
        raise TitlegenError(f"{prefix}: torch {torch.__version__} cannot shard 4-bit weights stored as uint8 "
                            "(pytorch#177844; torch 2.13 can); set --model.backbone.quant_storage bfloat16")
    if cfg.get("ckpt_path") and not _adapter_fsdp(strategy):
        raise TitlegenError(f"{prefix}: its checkpoints cannot resume a QLoRA run (ckpt_path {cfg.get('ckpt_path')}); "
                            "train with --trainer.strategy adapter_fsdp to resume")


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def _adapter_fsdp(strategy: str) -> bool:
    """titlegen's FSDP2 strategy, by its registered name or its class."""
    return strategy.lower() == "adapter_fsdp" or "AdapterFSDP" in strategy


def check_backoff(cfg) -> None:
    """``model.oom_backoff`` runs backward inside the step, which DDP/FSDP's gradient sync does not expect."""
    model, trainer = cfg.get("model") or {}, cfg.get("trainer") or {}
    if not model.get("oom_backoff"):
        return
    devices, strategy = trainer.get("devices"), str(trainer.get("strategy") or "")
    several = (isinstance(devices, int) and devices > 1) or (isinstance(devices, list | tuple) and len(devices) > 1) \
        or (isinstance(devices, str) and devices.strip() not in ("auto", "1", "0", "")) \
        or (trainer.get("num_nodes") or 1) > 1 or any(k in strategy for k in ("ddp", "fsdp", "deepspeed"))
    if several:
        raise TitlegenError("model.oom_backoff works on one device; with several, lower --data.max_tokens (or "
                            "--data.batch_size) and raise --trainer.accumulate_grad_batches instead")


def check_config_files(args: list[str]) -> None:
    """Every ``--config FILE`` exists and is valid YAML (jsonargparse would name it "<unicode string>")."""
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            name = args[i + 1]
        elif arg.startswith("--config="):
            name = arg.split("=", 1)[1]
        else:
            continue
        path = Path(name)
        if not path.is_file():
            raise TitlegenError(f"--config {name}: file not found")
        try:
            yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
            raise TitlegenError(f"{where}: not valid YAML ({getattr(err, 'problem', None) or err})") from None


def check_output(output: str | None, source: str | None, overwrite: bool) -> Path:
    """The predict output path: a file, never the input, never an existing file without ``--overwrite``."""
    if not output:
        raise TitlegenError("predict needs --output FILE.csv")
    path = Path(output)
    if output.endswith(("/", os.sep)) or path.is_dir():
        raise TitlegenError(f"--output {output}: is a directory; name the CSV file to write")
    if source and path.exists() and path.resolve() == Path(source).resolve():
        raise TitlegenError(f"--output {output}: is the input file (data.predict_path); name another file")
    if path.exists() and not overwrite:
        raise TitlegenError(f"--output {output}: already exists (pass --overwrite to replace it)")
    return path


def out_of_memory(cfg, subcommand: str) -> str:
    """One line for a GPU out-of-memory error: the batch settings in use and the flags that lower them."""
    data, trainer = cfg.get("data"), cfg.get("trainer")
    if subcommand == "fit":
        return (f"out of GPU memory at data.batch_size {data.batch_size}, data.max_tokens {data.max_tokens}, "
                f"data.max_length {data.max_length}: lower --data.max_tokens (or --data.batch_size) and raise "
                f"--trainer.accumulate_grad_batches (now {trainer.accumulate_grad_batches}) to keep the effective "
                "batch, set --model.backbone.checkpoint_fraction 1.0, or let titlegen do it: --model.oom_backoff true")
    return (f"out of GPU memory at data.eval_batch_size {data.eval_batch_size or data.batch_size}, "
            f"data.predict_max_tokens {data.predict_max_tokens}: lower --data.eval_batch_size or set "
            "--data.predict_max_tokens (rows x longest prompt per batch)")
