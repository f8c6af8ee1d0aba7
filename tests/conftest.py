"""Shared fixtures: a tokenizer trained here, a 2-layer Llama built from a config, fixture data written here.

Nothing comes from the network: HF_HUB_OFFLINE is set before transformers is imported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

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


@pytest.fixture
def fixture_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "trn.json", FIXTURE_ROWS)


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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with random weights and the trained tokenizer, saved like any HF model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny-llama")
    tok = train_tokenizer(directory)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(directory))
    return directory


def lora_model(model_dir: Path, quantization: str = "nf4", std: float = 0.05) -> torch.nn.Module:
    """The tiny model with a LoRA adapter (r=4) whose B matrices are non-zero, so the adapter changes outputs."""
    from titlegen.model import backbone as bb

    cfg = bb.BackboneConfig(name_or_path=str(model_dir), gradient_checkpointing=False, quantization=quantization)
    torch.manual_seed(0)
    model = bb.attach_lora(bb.load_base_model(cfg, torch.device("cpu")), bb.LoraSettings(r=4, alpha=8)).eval()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=std)
    return model


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
