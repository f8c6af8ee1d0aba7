"""The one metric list and the one report writer, used by ``validate``/``test`` (one system: the model) and by
``evaluate`` (two systems: the untuned base and the fine-tuned adapter).

A report directory holds ``report.json`` (every figure), ``report.md`` (metrics side by side, what each means,
and a few examples) and ``generations.csv`` (every row: title, reference, each system's text and whether it
ended with EOS).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from titlegen.io import atomic_write, atomic_write_text

# Generation metrics: logged to TensorBoard as <split>/gen/<key> and shown in every report, in this order.
METRICS: dict[str, str] = {
    "rougeL": "ROUGE-L F1 on lowercased words, 0-1, higher is better",
    "rouge1": "ROUGE-1 F1, 0-1, higher is better",
    "rouge2": "ROUGE-2 F1, 0-1, higher is better",
    "bleu": "SacreBLEU, 0-100, higher is better",
    "chrf": "chrF, 0-100, higher is better",
    "eos_stop_rate": "share of texts that ended with EOS before the token limit, higher is better",
    "loop_rate": "share of texts repeating a 4-word phrase 3+ times, lower is better",
    "distinct_2": "distinct word bigrams over all bigrams, higher is better",
    "length_ratio": "words generated per reference word, 1 is the reference's length",
}
# Scored on the references themselves (teacher forcing), where a loss pass ran.
LOSS_METRICS: dict[str, str] = {
    "loss": "cross-entropy per reference token, lower is better",
    "ppl": "perplexity on the references, lower is better",
}
EXAMPLE_CHARS = 700


def _one_line(text: str) -> str:
    """Newlines folded, so a generated '### ...' cannot become a Markdown heading; pipes escaped for tables."""
    return " ".join(text.split()).replace("|", "\\|")[:EXAMPLE_CHARS]


def markdown(title: str, systems: dict[str, dict], rows: list[dict], outputs: dict[str, list],
             notes: list[str], num_examples: int) -> str:
    names = list(systems)
    lines = [f"# {title}", "", "| metric | " + " | ".join(names) + " | meaning |", "|---|" + "---|" * (len(names) + 1)]
    for key, meaning in {**METRICS, **LOSS_METRICS}.items():
        if all(key in m for m in systems.values()):
            lines.append(f"| {key} | " + " | ".join(f"{systems[n][key]:.4f}" for n in names) + f" | {meaning} |")
    lines += ["", *notes, "", "## Examples", ""]
    for i, row in enumerate(rows[:num_examples]):
        lines += [f"{i + 1}. **title**: {_one_line(row['title'])}", f"   - **reference**: {_one_line(row['content'])}"]
        lines += [f"   - **{n}**: {_one_line(outputs[n][i].text)}" for n in names]
    return "\n".join(lines) + "\n"


def write_report(target: Path, title: str, report: dict, systems: dict[str, dict], rows: list[dict],
                 outputs: dict[str, list], notes: list[str] = (), num_examples: int = 8) -> None:
    """Write ``report.json`` (``report``), ``report.md`` and ``generations.csv`` into ``target``.

    Args:
        systems: Metrics of each system, by name (the columns of the Markdown table).
        outputs: Each system's generations (``.text``, ``.stopped``), one per row, in row order.
        notes: Extra Markdown lines under the table (a confidence interval, where the rows came from, ...).
    """
    target.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target / "report.json", json.dumps(report, indent=1, ensure_ascii=False))
    atomic_write_text(target / "report.md", markdown(title, systems, rows, outputs, list(notes), num_examples))

    def table(fh) -> None:
        writer = csv.writer(fh)
        writer.writerow(["title", "reference", *(f"{n}{suffix}" for n in outputs for suffix in ("", "_stopped"))])
        for i, row in enumerate(rows):
            cells = [x for n in outputs for x in (outputs[n][i].text, outputs[n][i].stopped)]
            writer.writerow([row["title"], row["content"], *cells])

    atomic_write(target / "generations.csv", table)


def summary(systems: dict[str, dict]) -> str:
    """The metric table as plain text, for the terminal."""
    names = list(systems)
    lines = [f"{'metric':<14}" + "".join(f"{n:>12}" for n in names)]
    for key in (*METRICS, *LOSS_METRICS):
        if all(key in m for m in systems.values()):
            lines.append(f"{key:<14}" + "".join(f"{systems[n][key]:>12.4f}" for n in names))
    return "\n".join(lines)
