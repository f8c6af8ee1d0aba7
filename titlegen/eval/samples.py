"""The validation samples in TensorBoard: a few fixed validation titles, what the model writes for them, and the
reference description, as one text table per validation."""

from __future__ import annotations

from titlegen.eval.rows import sample_batch, sample_rows
from titlegen.generate.engines import generate
from titlegen.model import sharding


def log_samples(module, step: int) -> None:
    """Generate for the sample titles with ``module``'s model and log the table at ``step`` (rank 0 logs; with
    sharded weights every rank generates too, since each forward gathers them from all)."""
    dm = module.trainer.datamodule
    if not sharding.generates_here(module) or dm is None or module.logger is None:
        return
    if not hasattr(module.logger.experiment, "add_text"):
        return
    rows = sample_rows(dm)
    if not rows:
        return
    batch = {k: v.to(module.device) for k, v in sample_batch(dm, [r["title"] for r in rows]).items()}
    outputs = generate(module.model, module.tokenizer, batch, module.generation)
    lines = ["| title | generated | reference |", "|---|---|---|"]
    for row, out in zip(rows, outputs):
        cells = [row["title"], out.text + ("" if out.stopped else " …"), row["content"][:600]]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    module.logger.experiment.add_text("val/samples", "\n".join(lines), global_step=step)
