"""Quality metrics of generated descriptions against references.

Overlap metrics come from torchmetrics (ROUGE-1/2/L, SacreBLEU, chrF; all offline). The rest are small and
explicit: EOS-stop rate, length ratio, distinct-2, the loop rate (a 4-word phrase said 3+ times), and a paired
bootstrap interval for the difference between two systems on the same rows.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lowercased alphanumeric words: the tokenization ROUGE uses."""
    return _WORD.findall(text.lower())


def rouge_per_example(preds: Sequence[str], refs: Sequence[str]) -> dict[str, list[float]]:
    """ROUGE-1/2/L F1 of each (prediction, reference) pair, from torchmetrics."""
    from torchmetrics.functional.text.rouge import rouge_score

    keys = ("rouge1", "rouge2", "rougeL")
    out: dict[str, list[float]] = {k: [] for k in keys}
    for pred, ref in zip(preds, refs):
        scores = rouge_score(pred, ref, rouge_keys=keys)  # rougeLsum would need nltk data (offline: no)
        for k in keys:
            out[k].append(float(scores[f"{k}_fmeasure"]))
    return out


def has_loop(text: str, n: int = 4, times: int = 3) -> bool:
    """True when some n-word phrase occurs ``times`` or more times (the greedy-decoding loop)."""
    w = words(text)
    counts = Counter(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
    return any(c >= times for c in counts.values())


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Unique n-grams over all n-grams, pooled over the outputs (1.0: no repetition at all)."""
    grams = [tuple(w[i:i + n]) for t in texts for w in [words(t)] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def corpus_scores(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    from torchmetrics.text import CHRFScore, SacreBLEUScore

    bleu = SacreBLEUScore()(list(preds), [[r] for r in refs])
    chrf = CHRFScore()(list(preds), [[r] for r in refs])
    return {"bleu": float(bleu) * 100, "chrf": float(chrf) * 100}


def quality_report(preds: Sequence[str], refs: Sequence[str], stopped: Sequence[bool]) -> dict:
    """All metrics of one system; ``per_example`` keeps ROUGE-L per row for paired comparisons."""
    if not preds:
        return {"rows": 0}
    rouge = rouge_per_example(preds, refs)
    ratios = [len(words(p)) / max(1, len(words(r))) for p, r in zip(preds, refs)]
    report = {
        "rows": len(preds),
        **{k: sum(v) / len(v) for k, v in rouge.items()},
        **corpus_scores(preds, refs),
        "eos_stop_rate": sum(stopped) / len(stopped),
        "loop_rate": sum(has_loop(p) for p in preds) / len(preds),
        "distinct_2": distinct_n(preds, 2),
        "length_ratio": sum(ratios) / len(ratios),
        "per_example": {"rougeL": rouge["rougeL"]},
    }
    return report


def paired_bootstrap(a: Sequence[float], b: Sequence[float], samples: int = 5000, seed: int = 0) -> dict:
    """Mean of ``b - a`` and its 95% percentile interval over resampled rows (the same rows for both)."""
    if len(a) != len(b) or not a:
        raise ValueError("paired_bootstrap needs two equally long, non-empty lists")
    diffs = [y - x for x, y in zip(a, b)]
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    return {"mean": sum(diffs) / n, "low": means[int(0.025 * samples)], "high": means[int(0.975 * samples) - 1]}
