"""Generation metrics of a validation/test split: generate a description for every row of the split, score it
against the reference (:data:`titlegen.eval.report.METRICS`), log the scores to TensorBoard as
``<split>/gen/<metric>`` and write a report to ``<run dir>/<split>_generation/``. Rank 0 does it alone (all
rows) so the figures never depend on the world size.
"""

from __future__ import annotations

from pathlib import Path

import torch

from titlegen.eval.metrics import quality_report
from titlegen.eval.report import METRICS, write_report
from titlegen.eval.rows import generation_loader, split_rows
from titlegen.generate.engines import generate
from titlegen.model import sharding


def wanted(mode: str, fn: str) -> bool:
    """``standalone``: in the validate/test commands only; ``always``: at every validation during fit too."""
    return mode == "always" or (mode == "standalone" and fn in ("validate", "test"))


@torch.no_grad()
def split_generation_metrics(module, split: str, losses: dict[str, float]) -> dict | None:
    dm = module.trainer.datamodule
    if not sharding.generates_here(module) or dm is None:
        return None
    rows = split_rows(dm, split)
    if not rows:
        return None
    outputs = {}
    with module.adapter_scope():
        for batch in generation_loader(dm, rows):
            inputs = {k: v.to(module.device) for k, v in batch.items() if k != "row"}
            outputs.update(zip(batch["row"].tolist(), generate(module.model, module.tokenizer, inputs,
                                                               module.generation)))
    outs = [outputs[i] for i in range(len(rows))]
    report = quality_report([o.text for o in outs], [r["content"] for r in rows], [o.stopped for o in outs])
    report.update(losses)
    shown = {**report, **{k.split("/", 1)[1]: v for k, v in losses.items()}}  # loss, ppl in the table
    if module.logger is not None:
        module.logger.log_metrics({f"{split}/gen/{k}": report[k] for k in METRICS}, step=module.global_step)
        target = Path(module.logger.log_dir or module.trainer.default_root_dir) / f"{split}_generation"
        write_report(target, f"{split} split: {len(rows)} rows", report, {"generated": shown}, rows,
                     {"generated": outs})
        module.print(f"{split} generation metrics ({len(rows)} rows): "
                     + ", ".join(f"{k} {report[k]:.4f}" for k in METRICS) + f"\nreport: {target}/report.md")
    return report
