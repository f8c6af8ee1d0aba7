"""What the tests share: fixture rows and files, a tokenizer trained here, a tiny LoRA model, a tiny run
configuration, the CLI run in-process, TensorBoard scalars, and callbacks that crash a run on purpose.

Fixtures live in ``conftest.py``; everything else here (no test file imports another).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch

# Hand-written rows with the real edge cases: entities, symbols, accents, edition notes, whitespace runs,
# an empty content, a content equal to the title, an exact duplicate and one title with two descriptions.
FIXTURE_ROWS = [
    ("Stainless Steel Water Bottle, 32 oz", "Keeps drinks cold for 24 hours and hot for 12. Leak-proof lid."),
    ("12-Pack AA Batteries", "Twelve alkaline AA batteries with a 10-year shelf life."),
    ('Oak Shelf Bracket 3/4"', "Solid oak bracket for 3/4\" boards; screws included."),
    ("AT&amp;T Cordless Phone", "DECT 6.0 phone with caller ID and a 1,000 ft range."),
    ("Café Espresso Cups™ (Set of 4)", "Porcelain cups, 3 oz each, with saucers. Crème-colored glaze."),
    ("The River at Night: A Novel", "A gripping story of four friends.--This text refers to thePaperbackedition."),
    ("Garden Hose 50 ft", "Kink-resistant hose&#8217;s brass fittings\n\n   last   for years."),
    ("Mystery Box", ""),
    ("Blue Pen", "Blue Pen"),
    ("Yoga Mat 6 mm", "Non-slip mat, 6 mm thick, with a carrying strap."),
    ("Yoga Mat 6 mm", "Non-slip mat, 6 mm thick, with a carrying strap."),
    ("Wool Socks, 3 Pairs", "Merino wool socks that keep feet warm and dry."),
    ("Wool Socks, 3 Pairs", "Soft merino socks in three colors."),
    ("Cast Iron Skillet 10 in", "Pre-seasoned skillet for stovetop, oven and campfire."),
    ("LED Desk Lamp", "Dimmable lamp with five brightness levels and a USB port."),
    ("Kids Rain Boots", "Waterproof rubber boots with easy pull-on handles."),
    ("Bamboo Cutting Board", "Large reversible board with a juice groove."),
    ("Silicone Baking Mat", "Non-stick mat that replaces parchment paper; oven safe to 480°F."),
    ("History of Rome: Volume 1", "An accessible account of the early republic.--This text refers to the Hardcover edition."),
    ("Señor Frog Plush Toy", "A soft 12-inch frog with a felt sombrero."),
    ("Digital Meat Thermometer", "Reads in 3 seconds; backlit display; IP67 waterproof."),
    ("Travel Pillow", "Memory foam neck pillow with a washable cover."),
    ("Hiking Backpack 40L", "Lightweight pack with a rain cover and hip belt."),
    ("Ceramic Planter Set", "Three white planters with drainage holes and trays."),
]


def write_jsonl(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for i, (title, content) in enumerate(rows):
            fh.write(json.dumps({"uid": f"T{i:04d}", "title": title, "content": content}) + "\n")
    return path


def train_tokenizer(directory: Path):
    """A byte-level BPE tokenizer (any UTF-8 text encodes) that adds BOS, trained on the fixture text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [t for row in FIXTURE_ROWS for t in row] * 4 + ["### Instruction: Describe the title. ### Response:"] * 4
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(directory))
    return fast


def lora_model(model_dir: Path, quantization: str = "nf4", std: float = 0.05) -> torch.nn.Module:
    """The tiny model with a LoRA adapter (r=4) whose B matrices are non-zero, so the adapter changes outputs."""
    from titlegen.model import backbone as bb
    from titlegen.model import lora

    cfg = bb.BackboneConfig(name_or_path=str(model_dir), gradient_checkpointing=False, quantization=quantization)
    torch.manual_seed(0)
    model = lora.attach_lora(bb.load_base_model(cfg, torch.device("cpu")), lora.LoraSettings(r=4, alpha=8)).eval()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=std)
    return model


def adapted(cfg, device: torch.device, r: int, alpha: int, std: float) -> torch.nn.Module:
    """The base model of backbone settings ``cfg`` on ``device`` with a new LoRA adapter, in training mode; its B
    matrices drawn with ``std`` (seed 0), so the adapter changes outputs and A gets gradients."""
    from titlegen.model import backbone as bb
    from titlegen.model import lora

    torch.manual_seed(0)
    model = lora.attach_lora(bb.load_base_model(cfg, device), lora.LoraSettings(r=r, alpha=alpha)).train()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=std)
    return model


def lora_grads(model_dir: Path, fuse: bool = False, autocast: bool = False, dropout: float = 0.0,
               **backbone) -> tuple[float, dict[str, torch.Tensor], torch.nn.Module, int]:
    """One forward + backward of the tiny model with a LoRA adapter (B non-zero, so A gets gradients): the loss,
    every adapter gradient, the model and how many modules ``fuse`` rerouted. The same ids and dropout masks in
    every call."""
    from titlegen.model import backbone as bb
    from titlegen.model import fused, lora

    cfg = bb.BackboneConfig(name_or_path=str(model_dir), **backbone)
    torch.manual_seed(0)
    model = lora.attach_lora(bb.load_base_model(cfg, torch.device("cpu")),
                             lora.LoraSettings(r=4, alpha=8, dropout=dropout)).train()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    changed = fused.install(model) if fuse else 0
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, model, changed


def tiny_config(tmp: Path, model_dir: Path, data: Path, **data_overrides) -> Path:
    """A config over base.yaml: tiny model, fixture data, short run, everything under ``tmp``."""
    cfg = {
        "trainer": {"max_steps": 6, "max_epochs": 10, "val_check_interval": 3, "check_val_every_n_epoch": None,
                    "log_every_n_steps": 1, "enable_progress_bar": False,
                    "default_root_dir": str(tmp / "runs")},
        "model": {"backbone": {"name_or_path": str(model_dir), "gradient_checkpointing": False},
                  "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
                  "optimizer": {"class_path": "bitsandbytes.optim.AdamW8bit",
                                "init_args": {"lr": 5e-3, "min_8bit_size": 16}},
                  "generation": {"max_new_tokens": 6}},
        "data": {"path": str(data), "batch_size": 4, "val_fraction": 0.25, "num_val_samples": 2,
                 "cache_dir": str(tmp / "cache"), "prompt": {"template": "### Instruction: Describe the title. "
                                                                         "{title} ### Response:"},
                 **data_overrides},
    }
    path = tmp / "tiny.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


class CrashAt(L.Callback):
    """Kills a run the hard way (an exception mid-training) when it is about to start step ``step + 1``."""

    def __init__(self, step: int = 3) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


class CrashAfterBatches(L.Callback):
    """Kills a predict run (an exception) once ``n`` batches are done."""

    def __init__(self, n: int = 2) -> None:
        self.n = n

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx + 1 == self.n:
            raise KeyboardInterrupt  # what Ctrl-C raises


def run(*args: str) -> int:
    """The CLI in this process; its exit code."""
    from titlegen.cli import main

    try:
        main(list(args))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


class SignalAt(L.Callback):
    """Sends this process ``signal`` once the run has finished optimizer step ``step`` (a preemption, a Ctrl-C)."""

    def __init__(self, step: int = 3, signal: str = "SIGTERM", rank: int | None = None) -> None:
        self.step, self.signal, self.rank = step, signal, rank  # rank: only that process gets it (None: every one)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import os
        import signal

        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), getattr(signal, self.signal))


class PoisonStep(L.Callback):
    """Makes the loss of ``steps`` optimizer steps from ``step`` on NaN (the trunk's final norm returns NaN for
    them; the loss reads the frozen head's weight directly, so a hook on the head would not run)."""

    def __init__(self, step: int = 2, steps: int = 1) -> None:
        self.step, self.steps, self._hook = step, steps, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.step <= trainer.global_step < self.step + self.steps:
            norm = pl_module._decoder.trunk.norm
            self._hook = norm.register_forward_hook(lambda m, args, out: out * float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


class MemoryLimit(L.Callback):
    """A GPU that holds at most ``rows`` training examples at once: a larger micro-batch raises what CUDA raises
    (the same exception type, on any device). ``also_at_call`` fails one more forward pass, the N-th, whatever
    its size: a step that runs out of memory after some of its parts already ran backward."""

    def __init__(self, rows: int = 2, also_at_call: int = 0) -> None:
        self.rows, self.also_at_call, self.calls = rows, also_at_call, 0

    def on_train_start(self, trainer, pl_module) -> None:
        import torch

        from titlegen.model.microbatch import rows_in

        inner = pl_module.forward_loss

        def limited(batch: dict):
            if torch.is_grad_enabled():
                self.calls += 1
                if rows_in(batch) > self.rows or self.calls == self.also_at_call:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return inner(batch)

        pl_module.forward_loss = limited


class RaiseOutOfMemory(L.Callback):
    """What CUDA raises when a batch does not fit (the same exception type, raised on any device)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
