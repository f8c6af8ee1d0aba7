"""titlegen: fine-tune a 4-bit causal LM with LoRA to write product descriptions from product titles."""

__version__ = "0.1.0"
