"""Decoding settings: one dataclass, documented for ``--help``, shared by validation samples, predict and
evaluate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from titlegen.errors import TitlegenError

Engine = Literal["auto", "titlegen", "hf"]


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings.

    Attributes:
        max_new_tokens: Longest description, in tokens.
        min_new_tokens: Suppress EOS before this many tokens (benchmarks use it to make every row run to the end).
        do_sample: Sample instead of greedy decoding.
        temperature: Sampling temperature (with ``do_sample``).
        top_p: Nucleus sampling mass (with ``do_sample``).
        top_k: Sample among the k most likely tokens; 0 turns it off (with ``do_sample``).
        repetition_penalty: >1 discourages tokens already generated.
        no_repeat_ngram_size: Never repeat an n-gram of this many tokens (0: off). Small models loop under
            greedy decoding; 3 stops that without hurting the text.
        engine: ``titlegen`` (our decoding loop, :mod:`titlegen.generate.loop`: much faster on a GPU, and for
            long outputs in big batches anywhere, as finished rows leave the batch), ``hf`` (transformers'
            ``generate``: a little faster per step on a few CPU cores at small batches), or ``auto``: titlegen on
            a GPU, hf elsewhere. Models whose attention cannot be swapped always use ``hf``. README: the figures.
        cuda_graphs: With the titlegen engine on a GPU, record each decoding step once as a CUDA graph and
            replay it (one launch instead of hundreds of Python-issued kernels per step), for batches of up to
            2,048 rows (the largest measured). Off: eager steps.
    """

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 3
    engine: Engine = "auto"
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        checks = {
            "max_new_tokens": self.max_new_tokens >= 1,
            "min_new_tokens": 0 <= self.min_new_tokens <= self.max_new_tokens,
            "temperature": self.temperature > 0,
            "top_p": 0 < self.top_p <= 1,
            "top_k": self.top_k >= 0,
            "repetition_penalty": self.repetition_penalty > 0,
            "no_repeat_ngram_size": self.no_repeat_ngram_size >= 0,
            "engine": self.engine in get_args(Engine),
        }
        wanted = {"max_new_tokens": ">= 1", "min_new_tokens": "between 0 and max_new_tokens", "temperature": "> 0",
                  "top_p": "in (0, 1]", "top_k": ">= 0 (0: off)", "repetition_penalty": "> 0 (1: off)",
                  "no_repeat_ngram_size": ">= 0 (0: off)", "engine": f"one of {', '.join(get_args(Engine))}"}
        for name, ok in checks.items():
            if not ok:
                raise TitlegenError(f"model.generation.{name}: got {getattr(self, name)!r}, expected {wanted[name]}")
