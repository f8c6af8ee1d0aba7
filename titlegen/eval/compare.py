"""``python -m titlegen evaluate``: the same rows through the untuned base and the fine-tuned adapter (one model
in memory, the adapter switched off for the base), with quality metrics side by side in a JSON + Markdown report.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch

from titlegen.errors import TitlegenError
from titlegen.eval.metrics import paired_bootstrap, quality_report
from titlegen.generate.writer import atomic_write

SYSTEMS = {"base": False, "fine-tuned": True}  # name -> adapter on
SHOWN = ("rougeL", "rouge1", "rouge2", "bleu", "chrf", "eos_stop_rate", "loop_rate", "distinct_2", "length_ratio",
         "loss", "ppl")


class TitlegenTrainer(L.Trainer):
    """Lightning's Trainer plus ``evaluate`` (a subcommand of the CLI)."""

    def evaluate(self, model: L.LightningModule, datamodule: L.LightningDataModule, ckpt_path: str | None = None,
                 report_dir: str | None = None, num_examples: int = 8) -> dict:
        """Compare the untuned base with the fine-tuned adapter on the evaluation rows.

        Args:
            model: The module (its ``adapter_path`` or ``ckpt_path`` gives the fine-tuned weights).
            datamodule: Provides the rows: ``data.eval_path``, else the test split, else the validation split.
            ckpt_path: A ``.ckpt`` file or an exported adapter directory.
            report_dir: Where ``report.json``, ``report.md`` and ``generations.csv`` go (default: ``eval/`` in
                the run directory of the checkpoint or adapter).
            num_examples: Rows shown side by side in the Markdown report.
        """
        return run_evaluation(self, model, datamodule, ckpt_path, report_dir, num_examples)


def run_evaluation(trainer: L.Trainer, model, dm, ckpt_path: str | None, report_dir: str | None,
                   num_examples: int) -> dict:
    if ckpt_path is None and not model.adapter_path:
        raise TitlegenError("evaluate needs --ckpt_path (a .ckpt file or an exported adapter directory)")
    if ckpt_path is not None:  # the checkpoint's prompt, as predict would use it
        dm.load_state_dict(torch.load(ckpt_path, map_location="cpu", weights_only=False).get(type(dm).__qualname__, {}))
    rows = dm.eval_rows()
    gen_loader, loss_loader = dm.eval_loaders(rows)
    results = {}
    model.eval_generation = "off"  # the validate calls below are for the loss only; generation happens here
    for name, adapter_on in SYSTEMS.items():
        model.use_adapter = adapter_on
        outputs = trainer.predict(model, dataloaders=gen_loader, ckpt_path=ckpt_path, return_predictions=True)
        by_row = {r: o for batch in outputs for r, o in zip(batch["row"], batch["outputs"])}
        [losses] = trainer.validate(model, dataloaders=loss_loader, ckpt_path=ckpt_path, verbose=False)
        results[name] = {"outputs": [by_row[i] for i in range(len(rows))],
                         "loss": losses["val/loss"], "ppl": losses["val/ppl"]}
    model.use_adapter = True
    report = build_report(rows, results, model.generation)
    target = Path(report_dir) if report_dir else default_report_dir(ckpt_path or model.adapter_path)
    write_report(target, report, rows, results, num_examples)
    print_summary(report, target)
    return report


def default_report_dir(source: str) -> Path:
    path = Path(source).resolve()
    run = path.parent.parent if path.is_file() and path.parent.name == "checkpoints" else path.parent
    return run / "eval"


def build_report(rows: list[dict], results: dict, generation) -> dict:
    refs = [r["content"] for r in rows]
    systems = {}
    for name, res in results.items():
        outs = res["outputs"]
        metrics = quality_report([o.text for o in outs], refs, [o.stopped for o in outs])
        metrics.update(loss=res["loss"], ppl=res["ppl"])
        systems[name] = metrics
    diff = paired_bootstrap(systems["base"]["per_example"]["rougeL"], systems["fine-tuned"]["per_example"]["rougeL"])
    return {"rows": len(rows), "generation": asdict(generation),
            "systems": systems, "rougeL_finetuned_minus_base": diff}


def write_report(target: Path, report: dict, rows: list[dict], results: dict, num_examples: int) -> None:
    target.mkdir(parents=True, exist_ok=True)
    atomic_write(target / "report.json", lambda fh: fh.write(json.dumps(report, indent=1, ensure_ascii=False)))
    atomic_write(target / "report.md", lambda fh: fh.write(markdown(report, rows, results, num_examples)))

    def table(fh) -> None:
        writer = csv.writer(fh)
        writer.writerow(["title", "reference", *(f"{n}{suffix}" for n in SYSTEMS for suffix in ("", "_stopped"))])
        for i, row in enumerate(rows):
            cells = [x for n in SYSTEMS for x in (results[n]["outputs"][i].text, results[n]["outputs"][i].stopped)]
            writer.writerow([row["title"], row["content"], *cells])

    atomic_write(target / "generations.csv", table)


def markdown(report: dict, rows: list[dict], results: dict, num_examples: int) -> str:
    names = list(SYSTEMS)
    lines = [f"# titlegen evaluation: {report['rows']} rows", "",
             "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in SHOWN:
        lines.append(f"| {key} | " + " | ".join(f"{report['systems'][n][key]:.4f}" for n in names) + " |")
    d = report["rougeL_finetuned_minus_base"]
    lines += ["", f"ROUGE-L fine-tuned minus base: {d['mean']:+.4f} (paired bootstrap 95% interval "
                  f"[{d['low']:+.4f}, {d['high']:+.4f}])", "", "## Examples", ""]
    for i in range(min(num_examples, len(rows))):
        lines += [f"### {rows[i]['title']}", "", f"- **reference**: {rows[i]['content'][:700]}"]
        lines += [f"- **{n}**: {results[n]['outputs'][i].text[:700]}" for n in names] + [""]
    return "\n".join(lines) + "\n"


def print_summary(report: dict, target: Path) -> None:
    names = list(SYSTEMS)
    print(f"\n{'metric':<14}" + "".join(f"{n:>12}" for n in names))
    for key in SHOWN:
        print(f"{key:<14}" + "".join(f"{report['systems'][n][key]:>12.4f}" for n in names))
    d = report["rougeL_finetuned_minus_base"]
    print(f"ROUGE-L gain {d['mean']:+.4f}  95% CI [{d['low']:+.4f}, {d['high']:+.4f}]\nreport: {target}/report.md")
