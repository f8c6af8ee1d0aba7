"""The real CLI on a tiny 2-layer Llama in NF4 on CPU: fit -> checkpoint -> resume -> predict, bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import FIXTURE_ROWS, run, scalars, tiny_config, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def setup(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "trn.json", FIXTURE_ROWS)
    return tmp_path, tiny_config(tmp_path, tiny_model_dir, data)


def test_fit_resume_predict(setup):
    tmp, cfg = setup
    # Uninterrupted: 6 steps in one go.
    assert run("fit", "--config", str(cfg), "--trainer.default_root_dir", str(tmp / "full")) == 0
    full = tmp / "full" / "version_0"
    # The same run killed after step 3 (its checkpoint), then resumed from that checkpoint.
    with pytest.raises(RuntimeError, match="simulated crash"):
        run("fit", "--config", str(cfg), "--trainer.callbacks+=tests.helpers.CrashAt")
    part = tmp / "runs" / "version_0"
    ckpt = part / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)
    assert state["global_step"] == 3
    assert state["state_dict"] and all(".lora_" in k for k in state["state_dict"])  # adapter tensors only
    assert run("fit", "--config", str(cfg), "--ckpt_path", str(ckpt)) == 0
    assert not (tmp / "runs" / "version_1").exists()  # the resumed run continues in its own directory

    expected, resumed = scalars(full, "train/loss"), scalars(part, "train/loss")
    assert sorted(expected) == sorted(resumed) == [0, 1, 2, 3, 4, 5]
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-5), step
    assert torch.load(part / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6

    # TensorBoard holds the curves and the text samples, with the untuned baseline at step 0.
    # (Lightning logs at the count of finished steps before the current one: steps 3 and 6 land on 2 and 5.)
    val = scalars(full, "val/loss")
    assert sorted(val) == [0, 2, 5] and set(scalars(full, "val/ppl")) == set(val)
    assert val[5] < val[0]
    assert any("text_summary" in t for t in _tensor_tags(full))

    # The exported adapter loads with plain PEFT and carries prompt, tokenizer and config.
    adapter = full / "adapter"
    for name in ("adapter_model.safetensors", "adapter_config.json", "prompt.yaml", "tokenizer.json", "config.yaml"):
        assert (adapter / name).is_file(), name

    titles = tmp / "titles.csv"
    titles.write_text('sku,title,note\n1,"Mug, ""Camp"" 12 oz",a\n2,,b\n3,"Café\nTable",c\n4,Wool Socks,d\n',
                      encoding="utf-8")
    for source in (str(full / "checkpoints" / "last.ckpt"), str(adapter)):
        out = tmp / f"out-{Path(source).name}.csv"  # a new file each time: an existing one needs --overwrite
        assert run("predict", "--config", str(cfg), "--ckpt_path", source, "--data.predict_path", str(titles),
                   "--output", str(out)) == 0
        rows = list(csv.DictReader(out.open(encoding="utf-8")))
        assert [r["sku"] for r in rows] == ["1", "2", "3", "4"]
        assert rows[0]["title"] == 'Mug, "Camp" 12 oz' and rows[2]["title"] == "Café\nTable"
        assert [r["note"] for r in rows] == ["a", "b", "c", "d"]
        assert rows[1]["description"] == "" and all(rows[i]["description"] for i in (0, 2, 3))
        assert not list(tmp.glob(f"{out.name}.*"))  # no journal or temp file left behind


def _tensor_tags(run_dir: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = []
    for events in run_dir.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags += acc.Tags()["tensors"]
    return tags


def test_second_run_uses_the_cache(setup, caplog):
    tmp, cfg = setup
    assert run("fit", "--config", str(cfg), "--trainer.max_steps", "1", "--trainer.val_check_interval", "1") == 0
    caplog.clear()
    assert run("validate", "--config", str(cfg)) == 0
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "using cached splits" in messages and "cleaning and tokenizing" not in messages


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("missing.json", None, "missing.json: file not found"),
        ("empty.json", b"", "empty.json: empty file"),
        ("broken.json", b'{"title": "a", "content": "b"}\n{"title": \n', "broken.json:2: not valid JSON"),
        ("latin1.json", '{"title": "caf\u00e9", "content": "x"}\n'.encode("latin-1"), "latin1.json:1: not UTF-8"),
    ],
)
def test_bad_training_file_is_one_line_and_exit_2(setup, capsys, name, content, expected):
    tmp, cfg = setup
    bad = tmp / name
    if content is not None:
        bad.write_bytes(content)
    assert run("fit", "--config", str(cfg), "--data.path", str(bad)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("titlegen: error: ") and expected in err[-1]
    assert not any("Traceback" in line for line in err)


def test_predict_csv_without_title_column(setup, capsys):
    tmp, cfg = setup
    bad = tmp / "names.csv"
    bad.write_text("sku,name\n1,Mug\n")
    assert run("predict", "--config", str(cfg), "--data.predict_path", str(bad), "--output", str(tmp / "o.csv")) == 2
    assert "names.csv:1: CSV header lacks column(s) 'title'" in capsys.readouterr().err
    assert not (tmp / "o.csv").exists()


def test_skip_bad_lines_reports_and_trains(setup, caplog):
    tmp, cfg = setup
    data = tmp / "mixed.json"
    data.write_bytes(write_jsonl(tmp / "ok.json", FIXTURE_ROWS).read_bytes() + b"{not json\n")
    assert run("fit", "--config", str(cfg), "--data.path", str(data), "--data.skip_bad_lines", "true",
               "--trainer.max_steps", "1", "--trainer.val_check_interval", "1") == 0
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped bad line" in text and "mixed.json:25" in text and "skipped bad lines 1" in text


def test_real_process_prints_no_traceback(setup):
    tmp, cfg = setup
    proc = subprocess.run([sys.executable, "-m", "titlegen", "fit", "--config", str(cfg), "--data.path",
                           str(tmp / "nope.jsonl")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"titlegen: error: {tmp / 'nope.jsonl'}: file not found"


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_parses(config, capsys):
    for sub in ("fit", "predict"):
        assert run(sub, "--config", str(config), "--print_config") == 0
        printed = capsys.readouterr().out
        assert "backbone:" in printed and "prompt:" in printed


def test_the_70b_fsdp_config_passes_the_checks_before_loading():
    """configs/llama3-70b-fsdp.yaml over the 8B recipe: nothing in it is refused before the model loads."""
    import yaml

    from titlegen.checks import check_settings

    def merged(base: dict, over: dict) -> dict:
        return {**base, **{k: merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                           for k, v in over.items()}}

    cfg = merged(*(yaml.safe_load((ROOT / "configs" / f).read_text())
                   for f in ("llama3-8b-qlora.yaml", "llama3-70b-fsdp.yaml")))
    assert cfg["trainer"]["strategy"] == "adapter_fsdp" and cfg["model"]["optimizer"]["init_args"]["lr"] == 1e-4
    check_settings(cfg, "fit")


def _ddp_fit(cfg, root: Path, *extra: str) -> subprocess.CompletedProcess:
    # LoRA without dropout, recomputed and offloaded layers and the fused projections: the GPU recipe's levers.
    cmd = [sys.executable, "-m", "titlegen", "fit", "--config", str(cfg), "--trainer.accelerator", "cpu",
           "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "4",
           "--trainer.val_check_interval", "2", "--trainer.default_root_dir", str(root), "--model.lora.dropout", "0",
           "--model.backbone.gradient_checkpointing", "true", "--model.backbone.offload_activations", "true",
           "--model.backbone.fused_lora", "true", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_ddp_two_processes_on_cpu_stop_on_one_rank_and_resume(setup):
    """The multi-GPU path on 2 CPU processes (gloo): each rank trains on its own shard of the batches. A SIGTERM
    that reaches only the second process stops both after the same step with last.ckpt written, and the resumed
    run logs the losses of an uninterrupted one."""
    tmp, cfg = setup
    full = _ddp_fit(cfg, tmp / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    run_dir = tmp / "full" / "version_0"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    stopped = _ddp_fit(cfg, tmp / "part", "--trainer.callbacks+=tests.helpers.SignalAt", "--trainer.callbacks.step=2",
                       "--trainer.callbacks.rank=1")
    assert stopped.returncode != 0 and "stopped by SIGTERM after step 2" in stopped.stderr, stopped.stderr[-3000:]
    part = tmp / "part" / "version_0"
    assert torch.load(part / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    resumed = _ddp_fit(cfg, tmp / "part", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = scalars(run_dir, "train/loss"), scalars(part, "train/loss")
    assert sorted(expected) == sorted(got) == [0, 1, 2, 3]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step


def test_two_nodes_under_torchrun_on_cpu(setup):
    """The multi-node recipe as far as one machine allows: two torchrun "nodes" of one CPU process each (gloo),
    the README's command with --trainer.num_nodes 2. Both nodes' first processes prepare the data into one cache
    folder (a shared file system): one builds it, the other waits for it."""
    import socket

    tmp, cfg = setup
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
         str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "titlegen", "fit", "--config",
         str(cfg), "--trainer.accelerator", "cpu", "--trainer.num_nodes", "2", "--trainer.devices", "1",
         "--trainer.strategy", "ddp", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT) for rank in (0, 1)]
    logs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert sum(log.count("data: cleaning and tokenizing") for log in logs) == 1
    run_dir = tmp / "runs" / "version_0"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert sorted(scalars(run_dir, "train/loss")) == [0, 1]
    assert not (tmp / "runs" / "version_1").exists()  # one run directory, written by global rank 0


def test_validate_reports_generation_metrics(setup):

    tmp, cfg = setup
    assert run("fit", "--config", str(cfg), "--trainer.max_steps", "1", "--trainer.val_check_interval", "1") == 0
    assert not list(tmp.rglob("val_generation"))  # fit validations stay fast: loss and samples only
    assert run("validate", "--config", str(cfg), "--model.generation.max_new_tokens", "6") == 0
    [report_dir] = list(tmp.rglob("val_generation"))
    report = json.loads((report_dir / "report.json").read_text())
    rows = list(csv.DictReader((report_dir / "generations.csv").open(encoding="utf-8")))
    assert report["rows"] == len(rows) > 0
    assert report["eos_stop_rate"] == sum(r["generated_stopped"] == "True" for r in rows) / len(rows)
    for key in ("rougeL", "bleu", "chrf", "distinct_2", "length_ratio", "loop_rate", "val/loss", "val/ppl"):
        assert key in report
    logged = scalars(report_dir.parent, "val/gen/rougeL")
    assert list(logged.values()) == pytest.approx([report["rougeL"]])


def test_fsdp2_on_two_cpu_processes_trains_as_ddp_resumes_and_exports_the_whole_adapter(setup):
    """FSDP2 (``--trainer.strategy adapter_fsdp``: each decoder layer and the trunk sharded over 2 gloo processes,
    the 4-bit weights with them) logs DDP's losses and exports the adapter whole, as DDP's: same names, shapes and
    values. Validation samples generate on every rank (they gather sharded weights). A run stopped by SIGTERM on
    one rank resumes from its one-file adapter checkpoint with the uninterrupted run's losses, and one process
    loads that checkpoint. Its refusals are one line each."""
    from safetensors.torch import load_file

    tmp, cfg = setup
    adamw = tmp / "adamw.yaml"
    adamw.write_text(json.dumps({"model": {"optimizer": {"class_path": "torch.optim.AdamW",
                                                          "init_args": {"lr": 5e-3}}}}))
    base = [sys.executable, "-m", "titlegen", "fit", "--config", str(cfg), "--config", str(adamw),
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.max_steps", "4",
            "--trainer.val_check_interval", "2", "--model.lora.dropout", "0"]
    fsdp2 = ["--trainer.strategy", "adapter_fsdp"]

    def fit(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *extra], capture_output=True, text=True, cwd=ROOT, timeout=600)

    runs = {}
    for name, strategy in (("ddp", ["--trainer.strategy", "ddp"]), ("fsdp2", fsdp2)):
        out = fit(*strategy, "--trainer.default_root_dir", str(tmp / name))
        assert out.returncode == 0, out.stderr[-3000:]
        runs[name] = tmp / name / "version_0"
    expected, got = scalars(runs["ddp"], "train/loss"), scalars(runs["fsdp2"], "train/loss")
    assert sorted(expected) == sorted(got) == [0, 1, 2, 3]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
    ddp, sharded = (load_file(runs[n] / "adapter" / "adapter_model.safetensors") for n in ("ddp", "fsdp2"))
    assert ddp.keys() == sharded.keys() and len(ddp) == 2 * 7 * 2
    for key in ddp:
        torch.testing.assert_close(sharded[key], ddp[key], rtol=1e-4, atol=1e-6, msg=key)

    part = ["--trainer.default_root_dir", str(tmp / "part")]
    stopped = fit(*fsdp2, *part, "--trainer.callbacks+=tests.helpers.SignalAt", "--trainer.callbacks.step=2",
                  "--trainer.callbacks.rank=1")
    assert stopped.returncode != 0 and "stopped by SIGTERM after step 2" in stopped.stderr, stopped.stderr[-3000:]
    last = tmp / "part" / "version_0" / "checkpoints" / "last.ckpt"
    assert last.is_file() and last.stat().st_size < 1e6  # the adapter and its optimizer state, no base weights
    resumed = fit(*fsdp2, *part, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for step, loss in scalars(tmp / "part" / "version_0", "train/loss").items():
        assert loss == pytest.approx(got[step], rel=1e-5), step
    one = run("validate", "--config", str(cfg), "--ckpt_path", str(runs["fsdp2"] / "checkpoints" / "last.ckpt"))
    assert one == 0

    model_parallel = ["--trainer.strategy", "lightning.pytorch.strategies.ModelParallelStrategy",
                      "--trainer.strategy.data_parallel_size", "2", "--trainer.strategy.tensor_parallel_size", "1"]
    for extra, message in (([*fsdp2, "--model.optimizer", "bitsandbytes.optim.AdamW8bit"],
                            "cannot step sharded weights"),
                           ([*fsdp2, "--model.backbone.training_graphs", "true", "--data.packing", "true"],
                            "not tested with model.backbone.training_graphs"),
                           ([*model_parallel, "--ckpt_path", "last"], "train with --trainer.strategy adapter_fsdp"),
                           (["--trainer.strategy", "fsdp"], "runs through --trainer.strategy adapter_fsdp")):
        out = fit(*extra)
        assert out.returncode == 2 and message in out.stderr and out.stderr.count("titlegen: error") == 1, out.stderr
    validate = [sys.executable, "-m", "titlegen", "validate", "--config", str(cfg), *fsdp2]
    out = subprocess.run(validate, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 2 and "shards fit only; run validate on one device" in out.stderr, out.stderr