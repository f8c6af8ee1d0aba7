"""What a new user meets off the happy path in the first hour: no data lost, one clear line and exit 2 for bad
input (checked before any model loads), SIGTERM obeyed, no noise. Test names carry the item numbers of the
"first hour" issue."""

from __future__ import annotations

import csv
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import FIXTURE_ROWS, run, tiny_config, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A fit of 2 steps; its adapter and config serve every predict/evaluate test here."""
    tmp = tmp_path_factory.mktemp("first_hour")
    cfg = tiny_config(tmp, tiny_model_dir, write_jsonl(tmp / "trn.json", FIXTURE_ROWS), eval_batch_size=4)
    assert run("fit", "--config", str(cfg), "--trainer.max_steps", "2", "--trainer.val_check_interval", "2") == 0
    return tmp, cfg, tmp / "runs" / "version_0" / "adapter"


def _csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([header, *rows])
    return path


def _predict(cfg, adapter, titles, output, *extra) -> int:
    return run("predict", "--config", str(cfg), "--ckpt_path", str(adapter), "--data.predict_path", str(titles),
               "--output", str(output), *extra)


def test_first_hour_02_predict_keeps_every_input_column(trained, tmp_path):
    _, cfg, adapter = trained
    titles = _csv(tmp_path / "in.csv", ["title", "description", "note", "note"],
                  [["Wool Socks", "my own text", "a", "b"], ["LED Desk Lamp", "", "c", "d"]])
    assert _predict(cfg, adapter, titles, tmp_path / "out.csv") == 0
    with (tmp_path / "out.csv").open(encoding="utf-8") as fh:
        header, *rows = list(csv.reader(fh))
    assert header == ["title", "description", "note", "note", "generated_description"]
    assert [r[:4] for r in rows] == [["Wool Socks", "my own text", "a", "b"], ["LED Desk Lamp", "", "c", "d"]]
    assert all(r[4] for r in rows)


def test_first_hour_02_predict_never_overwrites_without_asking(trained, tmp_path, capsys):
    _, cfg, adapter = trained
    titles = _csv(tmp_path / "in.csv", ["title"], [["Wool Socks"]])
    before = titles.read_bytes()
    assert _predict(cfg, adapter, titles, titles, "--overwrite", "true") == 2  # the input, even with --overwrite
    assert "is the input file" in capsys.readouterr().err and titles.read_bytes() == before
    existing = tmp_path / "done.csv"
    existing.write_text("precious\n")
    assert _predict(cfg, adapter, titles, existing) == 2
    assert "--overwrite" in capsys.readouterr().err and existing.read_text() == "precious\n"
    assert _predict(cfg, adapter, titles, existing, "--overwrite", "true") == 0
    assert existing.read_text().startswith("title,description")
    assert oct(existing.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not 0600 from a temp file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("flags, expected", [
    (["--output", "{tmp}/a_dir/"], "is a directory"),
    (["--model.generation.max_new_tokens", "0"], "model.generation.max_new_tokens: got 0, expected >= 1"),
    (["--data.batch_size", "0"], "data.batch_size: got 0, expected an integer >= 1"),
    (["--data.prompt.template", "no placeholder"], "data.prompt.template: must contain the placeholder {title}"),
    (["--trainer.max_step", "5"], "Unrecognized arguments: --trainer.max_step 5"),
])
def test_first_hour_04_12_bad_arguments_are_one_line_before_any_model_loads(trained, tmp_path, flags, expected):
    tmp, cfg, adapter = trained
    titles = _csv(tmp_path / "in.csv", ["title"], [["Wool Socks"]])
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    output = [] if "--output" in flags else ["--output", str(tmp_path / "out.csv")]
    cmd = [sys.executable, "-m", "titlegen", "predict", "--config", str(cfg), "--ckpt_path", str(adapter),
           "--data.predict_path", str(titles), *output, *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if "gemm_4bit" not in line and line.strip()]
    assert proc.returncode == 2 and lines == [lines[-1]] and expected in lines[-1], proc.stderr[-2000:]
    assert "model:" not in proc.stdout  # the model was never loaded


def test_first_hour_12_yaml_error_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: [1\n")
    assert run("fit", "--config", str(bad)) == 2
    assert f"{bad}:3:1: not valid YAML" in capsys.readouterr().err


def test_first_hour_12_usage_and_help_speak_for_titlegen(capsys):
    assert run("evaluate", "--help") == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m titlegen") and "Runs the full optimization routine" not in out
    assert "exported adapter directory" in out  # --ckpt_path
    assert run("fit", "--help") == 0
    assert "--model.lora.r R" in capsys.readouterr().out  # titlegen's own options, not hidden


def test_first_hour_05_max_length_too_small_is_an_error_not_an_empty_run(tmp_path, tiny_model_dir, capsys):
    cfg = tiny_config(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "trn.json", FIXTURE_ROWS))
    assert run("fit", "--config", str(cfg), "--data.max_length", "4") == 2
    assert "no training example fits data.max_length 4" in capsys.readouterr().err
    assert not list((tmp_path / "runs").glob("version_*"))


def test_first_hour_06_11_evaluate_samples_and_records_its_sources(trained, tmp_path):
    tmp, cfg, adapter = trained
    rows = write_jsonl(tmp_path / "held_out.json", FIXTURE_ROWS)
    assert run("evaluate", "--config", str(cfg), "--ckpt_path", str(adapter), "--data.eval_path", str(rows),
               "--data.max_records", "5", "--report_dir", str(tmp_path / "eval")) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["rows"] == 5 and report["source"]["dropped"]["by_max_records"] > 0
    assert report["adapter"] == str(adapter.resolve()) and report["source"]["path"] == str(rows.resolve())
    md = (tmp_path / "eval" / "report.md").read_text()
    assert str(adapter.resolve()) in md and "higher is better" in md and "lower is better" in md


def test_first_hour_07_14_sigterm_stops_predict_keeps_its_work_and_prints_no_noise(trained, tmp_path):
    _, cfg, adapter = trained
    titles = _csv(tmp_path / "in.csv", ["title"], [[f"Wool Socks {i}"] for i in range(3000)])
    out = tmp_path / "out.csv"
    cmd = [sys.executable, "-m", "titlegen", "predict", "--config", str(cfg), "--ckpt_path", str(adapter),
           "--data.predict_path", str(titles), "--output", str(out), "--data.eval_batch_size", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    journal = tmp_path / "out.csv.partial.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if journal.is_file() and len(journal.read_text().splitlines()) > 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and not out.exists(), err[-2000:]
    assert 3 < len(journal.read_text().splitlines()) < 3000  # the rows done so far are kept for the rerun
    # 14: no library deprecation notes, no Lightning guess about batch indices
    assert "FutureWarning" not in err and "Couldn't infer the batch indices" not in err, err[-2000:]


def test_first_hour_08_resume_elsewhere_or_longer_says_so(trained, tmp_path, caplog):
    tmp, cfg, _ = trained
    ckpt = tmp / "runs" / "version_0" / "checkpoints" / "last.ckpt"
    assert run("fit", "--config", str(cfg), "--ckpt_path", str(ckpt), "--trainer.max_steps", "3",
               "--trainer.val_check_interval", "3", "--trainer.default_root_dir", str(tmp_path / "other")) == 0
    text = caplog.text
    assert "in a new run under" in text and "--trainer.default_root_dir" in text
    assert "with 3 optimizer steps in all (the checkpoint's run had 2)" in text


def test_first_hour_04_broken_gzip_is_one_line(tmp_path, tiny_model_dir, capsys):
    lines = "".join(json.dumps({"title": f"T{i}", "content": "c " * 50}) + "\n" for i in range(2000))
    whole = gzip.compress(lines.encode())
    (tmp_path / "cut.json.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "fake.json.gz").write_text('{"title": "a", "content": "b"}\n')
    for name, expected in (("cut.json.gz", "ends early"), ("fake.json.gz", "not readable as gzip")):
        cfg = tiny_config(tmp_path, tiny_model_dir, tmp_path / name)
        assert run("fit", "--config", str(cfg)) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"titlegen: error: {tmp_path / name}") and expected in err and err.count("\n") == 1


def test_first_hour_10_predict_with_an_adapter_needs_no_config(trained, tmp_path):
    """The adapter records its base model and prompt: no --config, any working directory."""
    _, _, adapter = trained
    _csv(tmp_path / "in.csv", ["title"], [["Wool Socks"], ["LED Desk Lamp"]])
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        assert run("predict", "--ckpt_path", str(adapter), "--data.predict_path", "in.csv", "--output", "out.csv",
                   "--model.generation.max_new_tokens", "4", "--trainer.enable_progress_bar", "false") == 0
    finally:
        os.chdir(cwd)
    with (tmp_path / "out.csv").open(encoding="utf-8") as fh:
        assert [r["title"] for r in csv.DictReader(fh)] == ["Wool Socks", "LED Desk Lamp"]
