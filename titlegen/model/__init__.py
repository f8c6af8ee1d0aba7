"""The model side: the 4-bit base and its tokenizer, LoRA adapters, titlegen's attention functions, the merge,
the loss, the learning-rate schedule, the LightningModule and its callbacks. The only place (with the ``hf``
engine of :mod:`titlegen.generate.engines`) that imports transformers, peft or bitsandbytes."""
