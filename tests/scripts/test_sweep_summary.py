"""scripts/sweep_summary.py: one JSON line from a run's TensorBoard events and its evaluate reports."""

import json
import runpy
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

main = runpy.run_path(str(Path(__file__).resolve().parents[2] / "scripts" / "sweep_summary.py"))["main"]


def _report(diff: tuple[float, float, float], max_new_tokens: int) -> dict:
    system = {"rows": 3, "rougeL": 0.123456, "eos_stop_rate": 0.9, "loop_rate": 0.0, "length_ratio": 1.5,
              "ppl": 40.0, "rouge1": 0.2, "per_example": {"rougeL": [0.1, 0.1, 0.2]}}
    return {"rows": 3, "generation": {"max_new_tokens": max_new_tokens},
            "systems": {"base": system, "fine-tuned": {**system, "rougeL": 0.2}},
            "rougeL_finetuned_minus_base": dict(zip(("mean", "low", "high"), diff))}


def test_summary_reads_val_losses_and_every_report(tmp_path, capsys):
    writer = SummaryWriter(str(tmp_path / "version_0"))
    for step, loss in ((0, 4.0), (29, 3.5), (59, 3.0)):
        writer.add_scalar("val/loss", loss, step)
    writer.close()
    for i, (diff, tokens) in enumerate((((0.01, 0.002, 0.02), 128), ((-0.01, -0.02, 0.001), 512))):
        (tmp_path / f"eval{i}").mkdir()
        (tmp_path / f"eval{i}" / "report.json").write_text(json.dumps(_report(diff, tokens)))

    main("lr5e-4", str(tmp_path))
    out = json.loads(capsys.readouterr().out)

    assert out["name"] == "lr5e-4"
    assert out["val_loss"] == [[0, 4.0], [29, 3.5], [59, 3.0]]
    assert out["val_drop"] == 0.25
    assert out["eval0"]["rougeL_diff_ci"] == [0.01, 0.002, 0.02] and out["eval0"]["max_new_tokens"] == 128
    assert out["eval1"]["max_new_tokens"] == 512
    assert out["eval0"]["base"] == {"rougeL": 0.1235, "eos_stop_rate": 0.9, "loop_rate": 0.0, "length_ratio": 1.5,
                                    "ppl": 40.0}
    assert out["eval0"]["fine-tuned"]["rougeL"] == 0.2


def test_summary_of_a_run_without_events_or_reports(tmp_path, capsys):
    main("empty", str(tmp_path))
    assert json.loads(capsys.readouterr().out) == {"name": "empty"}
