"""``python -m titlegen evaluate``: the same rows through the untuned base and the fine-tuned adapter (one model
in memory, the adapter switched off for the base), with quality metrics side by side in a JSON + Markdown report.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import lightning as L

from titlegen.errors import TitlegenError
from titlegen.eval.metrics import paired_bootstrap, quality_report
from titlegen.eval.report import summary, write_report
from titlegen.eval.rows import eval_rows, generation_loader, loss_loader
from titlegen.model.safety import ReadableCheckpointIO

SYSTEMS = {"base": False, "fine-tuned": True}  # name -> adapter on


def run_evaluation(trainer: L.Trainer, model, dm, ckpt_path: str | None, report_dir: str | None,
                   num_examples: int) -> dict:
    if ckpt_path is None and not model.adapter_path:
        raise TitlegenError("evaluate needs --ckpt_path (a .ckpt file or an exported adapter directory)")
    if ckpt_path is not None:  # the checkpoint's prompt, as predict would use it
        checkpoint = ReadableCheckpointIO().load_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
        dm.load_state_dict(checkpoint.get(type(dm).__qualname__, {}))
    rows, source = eval_rows(dm)
    gen_loader, losses_loader = generation_loader(dm, rows), loss_loader(dm, rows)
    results = {}
    model.eval_generation = "off"  # the validate calls below are for the loss only; generation happens here
    for name, adapter_on in SYSTEMS.items():
        model.use_adapter = adapter_on
        outputs = trainer.predict(model, dataloaders=gen_loader, ckpt_path=ckpt_path, return_predictions=True)
        by_row = {r: o for batch in outputs for r, o in zip(batch["row"], batch["outputs"])}
        [losses] = trainer.validate(model, dataloaders=losses_loader, ckpt_path=ckpt_path, verbose=False)
        results[name] = {"outputs": [by_row[i] for i in range(len(rows))],
                         "loss": losses["val/loss"], "ppl": losses["val/ppl"]}
    model.use_adapter = True
    report = build_report(rows, results, model.generation)
    report.update(adapter=str(Path(ckpt_path or model.adapter_path).resolve()), source=source)
    target = Path(report_dir) if report_dir else default_report_dir(ckpt_path or model.adapter_path)
    d = report["rougeL_finetuned_minus_base"]
    gain = (f"ROUGE-L fine-tuned minus base: {d['mean']:+.4f} (paired bootstrap 95% interval "
            f"[{d['low']:+.4f}, {d['high']:+.4f}])")
    notes = [gain, "", f"Fine-tuned: `{report['adapter']}`.", f"Rows: {len(rows)} from `{source['path']}`"
             + (f" ({source['split']} split)" if "split" in source else
                f" ({source['read']} read; dropped: {source['dropped'] or 'none'})") + "."]
    write_report(target, f"titlegen evaluation: {len(rows)} rows", report, report["systems"], rows,
                 {n: r["outputs"] for n, r in results.items()}, notes, num_examples)
    print(f"\n{summary(report['systems'])}\n{gain}\nreport: {target}/report.md")
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
