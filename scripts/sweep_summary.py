"""One JSON line for a quality-sweep run: val/loss per validation (TensorBoard events) and each evaluate report.

Usage: python scripts/sweep_summary.py NAME RUN_DIR   (RUN_DIR holds version_0/ and eval*/report.json)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HEADLINE = ("rougeL", "eos_stop_rate", "loop_rate", "length_ratio", "ppl")


def val_losses(run: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(run.glob("version_0/events.out.tfevents*"))
    if not events:
        return []
    acc = EventAccumulator(str(events[0]), size_guidance={"scalars": 0})
    acc.Reload()
    if "val/loss" not in acc.Tags()["scalars"]:
        return []
    return [(e.step, round(e.value, 4)) for e in acc.Scalars("val/loss")]


def report_summary(path: Path) -> dict:
    report = json.loads(path.read_text())
    out = {name: {k: round(v, 4) for k, v in metrics.items() if k in HEADLINE}
           for name, metrics in report["systems"].items()}
    d = report["rougeL_finetuned_minus_base"]
    out["rougeL_diff_ci"] = [round(d["mean"], 4), round(d["low"], 4), round(d["high"], 4)]
    out["max_new_tokens"] = report["generation"].get("max_new_tokens")
    return out


def main(name: str, run_dir: str) -> None:
    run = Path(run_dir)
    summary: dict = {"name": name}
    losses = val_losses(run)
    if losses:
        summary["val_loss"] = losses
        summary["val_drop"] = round(1 - losses[-1][1] / losses[0][1], 4)
    for report in sorted(run.glob("eval*/report.json")):
        summary[report.parent.name] = report_summary(report)
    print(json.dumps(summary))


if __name__ == "__main__":
    main(*sys.argv[1:3])
