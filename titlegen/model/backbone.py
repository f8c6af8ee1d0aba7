"""Load the base causal LM and its tokenizer through transformers: 4-bit NF4 through ``BitsAndBytesConfig``
when asked, gradient checkpointing, the CPU guard against bitsandbytes' silent wrong gradients.

transformers, peft and bitsandbytes are imported only in :mod:`titlegen.model` (backbone, lora, attention, merge,
fused) and by the ``hf`` engine in :mod:`titlegen.generate.engines`; everything else sees plain
``torch.nn.Module``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from titlegen.errors import TitlegenError
from titlegen.model import fused
from titlegen.model.attention import register_attentions
from titlegen.model.lora import unwrap
from titlegen.model.offload import ActivationStore

log = logging.getLogger("titlegen")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_STORAGE = {**_DTYPES, "uint8": torch.uint8}


@dataclass
class BackboneConfig:
    """Which base model to load and how.

    Attributes:
        name_or_path: Local directory of a Hugging Face causal LM (or a Hub name, if the Hub is reachable).
        quantization: ``nf4``/``fp4`` quantize the linear layers to 4 bits with bitsandbytes; ``none`` keeps them.
        double_quant: Quantize the 4-bit scales too (saves ~0.4 bit per weight).
        quant_storage: The dtype the packed 4-bit weights are stored in; the bits and results are the same. FSDP1's
            flat parameters need the other parameters' dtype (bfloat16); FSDP2 shards any (titlegen's ``fit`` does
            not shard 4-bit weights yet).
        compute_dtype: dtype of the non-quantized weights and of the 4-bit matmuls; ``auto`` is bfloat16 on a GPU
            and float32 on a CPU.
        attn_implementation: ``sdpa`` (default), ``titlegen_varlen`` (needed by ``data.packing``: PyTorch's
            variable-length flash attention on CUDA, exact per-example attention elsewhere), ``eager``, ...
        gradient_checkpointing: Recompute activations in the backward pass (much less memory, ~1/3 more compute).
        checkpoint_fraction: Share of the decoder layers that recompute (the first ones); the rest keep their
            activations. Between 0 and 1 it trades memory for speed where all-or-nothing does not fit.
        liger_kernel: Swap in Liger's fused Triton kernels for RMSNorm, RoPE and SwiGLU (GPU; needs
            ``liger-kernel``).
        offload_activations: Keep the recomputed layers' inputs in pinned CPU memory instead of on the GPU
            (copied while the GPU computes); the memory they took grows with tokens per step (2 GiB at 8,192
            tokens on a 32-layer 4,096-wide model).
        compile_layers: ``torch.compile`` each decoder layer's parts (attention, MLP, norms) for training: fused
            element-wise kernels and fewer saved activations; the first steps take longer while it compiles.
        fused_lora: Train each SwiGLU MLP and each other adapted projection as one fused autograd function
            (the same math as PEFT with less host time and fewer saved activations; ``titlegen/model/fused.py``).
        fused_lora_inference: The same fused paths without gradients (validation; predict with the 4-bit base
            and adapter): the LoRA update added inside the base matmul (H200, 8B NF4 predict: +3% and +9% in two runs).
        training_graphs: Record the packed training step's decoder trunk as CUDA graphs and replay them (GPU;
            needs ``data.packing`` and no LoRA dropout; ``titlegen/model/step_graphs.py``). Works with
            ``offload_activations`` and ``compile_layers``.
        trust_remote_code: Run the Python files a model directory ships (its own model or tokenizer code). Off:
            such a model stops with one line saying so. Turn it on only for a model whose code you trust.
    """

    name_or_path: str = ""
    quantization: Literal["nf4", "fp4", "none"] = "nf4"
    double_quant: bool = True
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = True
    checkpoint_fraction: float = 1.0
    liger_kernel: bool = False
    offload_activations: bool = False
    compile_layers: bool = False
    fused_lora: bool = False
    fused_lora_inference: bool = True
    training_graphs: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.checkpoint_fraction <= 1.0:
            raise TitlegenError(f"model.backbone.checkpoint_fraction: got {self.checkpoint_fraction}, expected 0..1")
        if self.offload_activations and not self.gradient_checkpointing:
            raise TitlegenError("model.backbone.offload_activations: needs model.backbone.gradient_checkpointing "
                                "true (it offloads the inputs of the recomputed layers)")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def check_model_path(name_or_path: str) -> None:
    """Fail with one clear line when a local model directory is named but absent or incomplete.

    A name shaped like ``org/model`` that is not a local directory is left to Hugging Face (a Hub name).
    """
    if not name_or_path:
        raise TitlegenError("model.backbone.name_or_path is empty: name a local model directory")
    path = Path(name_or_path).expanduser()
    hub_like = re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path) is not None and not name_or_path.startswith(".")
    if path.exists() or not hub_like:
        if not (path / "config.json").is_file():
            hint = " (run: python scripts/fetch_quickstart_model.py)" if "SmolLM2" in name_or_path else ""
            raise TitlegenError(f"{name_or_path}: no model here (expected a directory with config.json){hint}")


def _remote_code_error(name_or_path: str, err: ValueError) -> TitlegenError | None:
    if "trust_remote_code" not in str(err):
        return None
    return TitlegenError(f"{name_or_path}: the model ships its own Python code, which titlegen does not run unless "
                         "model.backbone.trust_remote_code is true (set it only for code you trust)")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The base model's tokenizer, with a pad token (padding is masked by position, so pad == eos is safe)."""
    from transformers import AutoTokenizer

    check_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except ValueError as err:
        raise (_remote_code_error(name_or_path, err) or err) from None
    if tok.eos_token_id is None:
        raise TitlegenError(f"{name_or_path}: the tokenizer has no eos_token; set one in tokenizer_config.json")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.clean_up_tokenization_spaces = False  # that clean-up deletes real spaces before punctuation
    return tok


def load_base_model(cfg: BackboneConfig, device: torch.device) -> torch.nn.Module:
    """Load the base causal LM on ``device``, quantized to 4 bits when ``cfg.quantization`` asks."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    check_model_path(cfg.name_or_path)
    register_attentions()  # titlegen's attention names become valid attn_implementation values
    dtype = resolve_dtype(cfg.compute_dtype, device)
    kwargs: dict = {"dtype": dtype, "attn_implementation": cfg.attn_implementation,
                    "trust_remote_code": cfg.trust_remote_code}
    if cfg.quantization != "none":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=cfg.quantization, bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=_STORAGE[cfg.quant_storage])
    # Each process (DDP rank) places its own copy on its own device; "auto" would put all of it on one rank.
    kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)
    except ValueError as err:
        raise (_remote_code_error(cfg.name_or_path, err) or err) from None
    disable_cpu_4bit_repacking(model)
    if cfg.liger_kernel:
        apply_liger(model)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen embeddings, so no enable_input_require_grads hack.
        # Graphs: no RNG state saved for the recomputation (reading it is not allowed inside a capture; graphs
        # refuse dropout, so there is nothing to replay).
        recompute = {"use_reentrant": False, "preserve_rng_state": not cfg.training_graphs,
                     "context_fn": fused.recompute_contexts}  # the fused MLP may skip what a recomputation discards
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=recompute)
        layers = limit_checkpointing(model, cfg.checkpoint_fraction)
        if cfg.offload_activations:
            store = ActivationStore(len(layers), preserve_rng=not cfg.training_graphs)
            store.install(layers)
            split_decoder(model).trunk.activation_store = store  # training_graphs gives it fixed buffers
    model.config.use_cache = not cfg.gradient_checkpointing
    return model


def limit_checkpointing(model: torch.nn.Module, fraction: float) -> list[torch.nn.Module]:
    """Keep recomputation on the first ``fraction`` of the decoder layers only; returns those layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"model.backbone.checkpoint_fraction must be in [0, 1], got {fraction}")
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    keep = round(fraction * len(layers))
    for layer in layers[keep:]:
        layer.gradient_checkpointing = False
    return layers[:keep]


def apply_liger(model: torch.nn.Module) -> None:
    """Fused RMSNorm / RoPE / SwiGLU kernels; the loss stays titlegen's own (response tokens only, chunked)."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as err:
        raise TitlegenError("model.backbone.liger_kernel needs the liger-kernel package (GPU only)") from err
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)


def disable_cpu_4bit_repacking(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for AVX512-BF16 CPUs.

    On such CPUs an eval-mode no-grad forward (Lightning's sanity check, validation) repacks each
    ``Linear4bit`` weight in place, after which every backward silently drops gradients. The CUDA path never
    takes this branch. Returns the number of layers changed.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as the number of values they store (in any
    storage dtype, sharded or not)."""
    packed = {id(m.weight): m.in_features * m.out_features for m in model.modules()
              if type(m).__name__ == "Linear4bit"}
    trainable = total = 0
    for p in model.parameters():
        n = packed.get(id(p), p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


@dataclass
class Decoder:
    """The pieces of a causal LM that a memory-saving loss needs: trunk (hidden states) and output head."""

    trunk: torch.nn.Module
    head: torch.nn.Module


def split_decoder(model: torch.nn.Module) -> Decoder:
    """Find the transformer trunk and the LM head inside a (PEFT-wrapped) causal LM."""
    causal_lm = unwrap(model)
    head = causal_lm.get_output_embeddings()
    trunk = causal_lm.get_decoder()
    if head is None or trunk is None:
        raise TitlegenError(f"{type(causal_lm).__name__}: cannot find the decoder trunk and output head")
    return Decoder(trunk=trunk, head=head)
