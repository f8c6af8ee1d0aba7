"""Generation metrics of a validation/test split: generate a description for every row of the split, score it
against the reference (ROUGE, BLEU, chrF, EOS-stop rate, loop rate, distinct-2, length ratio), log the scores to
TensorBoard as ``<split>/gen/<metric>`` and write ``report.json`` / ``report.md`` / ``generations.csv`` to
``<run dir>/<split>_generation/``. Rank 0 does it alone (all rows) so the figures never depend on the world size.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from titlegen.generate.engines import generate
from titlegen.eval.metrics import quality_report
from titlegen.generate.writer import atomic_write

LOGGED = ("rougeL", "rouge1", "rouge2", "bleu", "chrf", "eos_stop_rate", "loop_rate", "distinct_2", "length_ratio")


def wanted(mode: str, fn: str) -> bool:
    """``standalone``: in the validate/test commands only; ``always``: at every validation during fit too."""
    return mode == "always" or (mode == "standalone" and fn in ("validate", "test"))


@torch.no_grad()
def split_generation_metrics(module, split: str, losses: dict[str, float]) -> dict | None:
    dm = module.trainer.datamodule
    if module.global_rank != 0 or dm is None:
        return None
    rows = dm.split_rows(split)
    if not rows:
        return None
    outputs = {}
    with module.adapter_scope():
        for batch in dm.generation_loader(rows):
            inputs = {k: v.to(module.device) for k, v in batch.items() if k != "row"}
            outputs.update(zip(batch["row"].tolist(), generate(module.model, module.tokenizer, inputs,
                                                               module.generation)))
    outs = [outputs[i] for i in range(len(rows))]
    report = quality_report([o.text for o in outs], [r["content"] for r in rows], [o.stopped for o in outs])
    report.update(losses)
    if module.logger is not None:
        module.logger.log_metrics({f"{split}/gen/{k}": report[k] for k in LOGGED}, step=module.global_step)
        target = Path(module.logger.log_dir or module.trainer.default_root_dir) / f"{split}_generation"
        write_split_report(target, split, report, rows, outs)
        module.print(f"{split} generation metrics ({len(rows)} rows): "
                     + ", ".join(f"{k} {report[k]:.4f}" for k in LOGGED) + f"\nreport: {target}/report.md")
    return report


def write_split_report(target: Path, split: str, report: dict, rows: list[dict], outs: list) -> None:
    target.mkdir(parents=True, exist_ok=True)
    lines = [f"# {split} split: {report['rows']} rows", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {report[k]:.4f} |" for k in (*LOGGED, "loss", "ppl") if k in report]
    lines += ["", "## Examples", ""]
    for row, out in list(zip(rows, outs))[:8]:
        lines += [f"### {row['title']}", "", f"- **reference**: {row['content'][:700]}",
                  f"- **generated**: {out.text[:700]}", ""]
    atomic_write(target / "report.json", lambda fh: fh.write(json.dumps(report, indent=1, ensure_ascii=False)))
    atomic_write(target / "report.md", lambda fh: fh.write("\n".join(lines) + "\n"))

    def table(fh) -> None:
        writer = csv.writer(fh)
        writer.writerow(["title", "reference", "generated", "stopped"])
        writer.writerows([r["title"], r["content"], o.text, o.stopped] for r, o in zip(rows, outs))

    atomic_write(target / "generations.csv", table)
