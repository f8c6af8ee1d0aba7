"""Predict never loses work; evaluate reports base and fine-tuned metrics that an independent ROUGE-L confirms."""

from __future__ import annotations

import csv
import json
import re

import pytest

from tests.helpers import FIXTURE_ROWS, run, tiny_config, write_jsonl

TITLES = ['Mug, "Camp" 12 oz', "Café Table\nRound", "Wool Socks", "", "Garden Hose 50 ft", "LED Desk Lamp",
          "Bamboo Cutting Board", "Señor Frog Plush", "Travel Pillow", "12-Pack AA Batteries"]


@pytest.fixture
def trained(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "trn.json", FIXTURE_ROWS)
    cfg = tiny_config(tmp_path, tiny_model_dir, data, eval_batch_size=3)
    assert run("fit", "--config", str(cfg), "--trainer.max_steps", "2", "--trainer.val_check_interval", "2") == 0
    titles = tmp_path / "titles.csv"
    with titles.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "title"])
        writer.writerows((i, t) for i, t in enumerate(TITLES))
    return tmp_path, cfg, tmp_path / "runs" / "version_0" / "adapter", titles


def test_interrupted_predict_resumes_to_the_same_rows(trained):
    tmp, cfg, adapter, titles = trained
    common = ["--config", str(cfg), "--ckpt_path", str(adapter), "--data.predict_path", str(titles)]
    assert run("predict", *common, "--output", str(tmp / "full.csv")) == 0
    out = tmp / "resumed.csv"
    run("predict", *common, "--output", str(out), "--trainer.callbacks+=tests.helpers.CrashAfterBatches")
    journal = tmp / "resumed.csv.partial.jsonl"
    assert not out.exists() and journal.is_file()  # nothing half-written; the work done so far is kept
    done_before = len(journal.read_text().splitlines()) - 1
    assert 0 < done_before < len(TITLES) - 1
    assert run("predict", *common, "--output", str(out)) == 0
    assert not journal.exists()
    assert out.read_bytes() == (tmp / "full.csv").read_bytes()
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert [r["title"] for r in rows] == TITLES and rows[3]["description"] == ""


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _rouge_l(pred: str, ref: str) -> float:
    p, r = (re.findall(r"[a-z0-9]+", t.lower()) for t in (pred, ref))
    lcs = _lcs(p, r)
    if not p or not r or not lcs:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def test_evaluate_reports_both_systems_and_rouge_l_agrees(trained):
    tmp, cfg, adapter, _ = trained
    rows = write_jsonl(tmp / "held_out.json", FIXTURE_ROWS[:8])
    assert run("evaluate", "--config", str(cfg), "--ckpt_path", str(adapter), "--data.eval_path", str(rows),
               "--report_dir", str(tmp / "eval")) == 0
    report = json.loads((tmp / "eval" / "report.json").read_text())
    assert set(report["systems"]) == {"base", "fine-tuned"} and report["rows"] == 7  # one has no content
    md = (tmp / "eval" / "report.md").read_text()
    assert "| rougeL |" in md and "**title**: Stainless Steel Water Bottle" in md and "**fine-tuned**" in md
    gens = list(csv.DictReader((tmp / "eval" / "generations.csv").open(encoding="utf-8")))
    for name in ("base", "fine-tuned"):
        independent = sum(_rouge_l(g[name], g["reference"]) for g in gens) / len(gens)
        assert abs(report["systems"][name]["rougeL"] - independent) < 0.01
        for key in ("rouge1", "rouge2", "bleu", "chrf", "eos_stop_rate", "loop_rate", "distinct_2",
                    "length_ratio", "loss", "ppl"):
            assert key in report["systems"][name]


def test_a_title_longer_than_the_context_is_cut_with_a_warning_naming_the_row(tmp_path, tiny_model_dir, caplog):
    cfg = tiny_config(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "trn.json", FIXTURE_ROWS))
    titles, out = tmp_path / "titles.csv", tmp_path / "out.csv"
    with titles.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["title"], ["Wool Socks"], ["Desk Lamp " * 400], ["Mug"]])  # 4,000 characters
    assert run("predict", "--config", str(cfg), "--data.predict_path", str(titles), "--output", str(out)) == 0
    # The tiny model's context is 512 positions and the config generates up to 6 tokens.
    assert "1 title(s) too long for the model's context were cut to fit 506 prompt tokens (data rows 2)" in caplog.text
    with out.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["title"] for r in rows] == ["Wool Socks", "Desk Lamp " * 400, "Mug"]  # the input is kept whole
    assert all(r["description"] is not None for r in rows)


def test_predict_on_two_processes_writes_the_one_process_csv_and_resumes_a_one_process_run(tmp_path,
                                                                                          tiny_model_dir):
    """Several devices (2 CPU processes, gloo): each rank takes every other batch and keeps its own journal; rank
    0 merges them into one CSV in input order. A run stopped on one device continues on two."""
    import subprocess
    import sys
    from pathlib import Path

    cfg = tiny_config(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "trn.json", FIXTURE_ROWS), eval_batch_size=2)
    titles = tmp_path / "titles.csv"
    with titles.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["id", "title"], *((i, t) for i, t in enumerate(TITLES))])
    common = ["--config", str(cfg), "--data.predict_path", str(titles)]
    assert run("predict", *common, "--output", str(tmp_path / "one.csv")) == 0

    def two_processes(out: str) -> str:
        cmd = [sys.executable, "-m", "titlegen", "predict", *common, "--output", str(tmp_path / out),
               "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2],
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stderr

    two_processes("two.csv")
    assert (tmp_path / "two.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()

    run("predict", *common, "--output", str(tmp_path / "resumed.csv"), "--trainer.callbacks+=tests.helpers.CrashAfterBatches")
    journal = tmp_path / "resumed.csv.partial.jsonl"
    assert journal.is_file() and not (tmp_path / "resumed.csv").exists()
    log = two_processes("resumed.csv")
    assert re.search(r"resuming from resumed.csv.partial\*.jsonl \([1-9] of 10 rows already done\)", log), log[-2000:]
    assert (tmp_path / "resumed.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()
    assert not list(tmp_path.glob("*.partial*"))  # every journal merged and removed
