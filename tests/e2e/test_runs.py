"""Runs that do not lose work: a signal between two steps leaves last.ckpt and the resumed run ends with the same
loss curve; a NaN step is skipped and counted; a broken checkpoint is one line."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import FIXTURE_ROWS, run, scalars, tiny_config, write_jsonl


@pytest.fixture
def cfg(tmp_path, tiny_model_dir):
    return tiny_config(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "trn.json", FIXTURE_ROWS))


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_between_steps_writes_last_ckpt_and_resume_matches(cfg, tmp_path, sig):
    assert run("fit", "--config", str(cfg), "--trainer.default_root_dir", str(tmp_path / "full")) == 0
    code = run("fit", "--config", str(cfg), "--trainer.callbacks+=tests.helpers.SignalAt",
               "--trainer.callbacks.step=3", f"--trainer.callbacks.signal={sig}")
    assert code == 128 + {"SIGTERM": 15, "SIGINT": 2}[sig]  # stopped, not finished
    part = tmp_path / "runs" / "version_0"
    assert torch.load(part / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert not (part / "adapter").exists()  # an unfinished run exports no adapter
    assert run("fit", "--config", str(cfg), "--ckpt_path", "last") == 0
    expected, resumed = scalars(tmp_path / "full" / "version_0", "train/loss"), scalars(part, "train/loss")
    assert sorted(expected) == sorted(resumed) == [0, 1, 2, 3, 4, 5]
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-5), step


def test_a_nan_step_is_skipped_and_counted(cfg, tmp_path):
    assert run("fit", "--config", str(cfg), "--trainer.callbacks+=tests.helpers.PoisonStep",
               "--trainer.callbacks.step=2") == 0
    run_dir = tmp_path / "runs" / "version_0"
    skipped = scalars(run_dir, "train/skipped_steps")
    assert skipped[1] == 0.0 and skipped[2] == skipped[5] == 1.0  # counted once, at the poisoned step
    losses = scalars(run_dir, "train/loss")
    assert sorted(losses) == [0, 1, 2, 3, 4, 5] and all(v == v for s, v in losses.items() if s != 2)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()  # the run finished
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(t).all() for t in saved.values())  # the NaN never reached the weights


def test_nan_steps_in_a_row_stop_with_the_last_good_weights(cfg, tmp_path, capsys):
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(json.dumps({"trainer": {"callbacks": [
        {"class_path": "titlegen.model.safety.SkipNonFinite", "init_args": {"max_in_row": 2}},
        {"class_path": "tests.helpers.PoisonStep", "init_args": {"step": 1, "steps": 5}}]}}))
    assert run("fit", "--config", str(cfg), "--config", str(callbacks)) == 2
    err = capsys.readouterr().err
    assert "2 steps in a row with a non-finite loss or gradients" in err and err.count("\n") == 1
    [ckpt] = (tmp_path / "runs").glob("version_0/checkpoints/last.ckpt")
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert saved and all(torch.isfinite(t).all() for t in saved.values())


def test_a_truncated_checkpoint_is_one_line(cfg, tmp_path, capsys):
    assert run("fit", "--config", str(cfg), "--trainer.max_steps", "1", "--trainer.val_check_interval", "1") == 0
    ckpt = tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    assert run("fit", "--config", str(cfg), "--ckpt_path", str(ckpt)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"titlegen: error: {ckpt}: not a readable checkpoint") and err.count("\n") == 1


def test_prepare_builds_the_cache_that_fit_then_finds(cfg, tmp_path, capsys, caplog):
    assert run("prepare", "--config", str(cfg)) == 0
    out = capsys.readouterr().out
    assert "prepared: " in out and "model:" not in out  # the tokenizer only: no model loaded
    [cache] = [d for d in (tmp_path / "cache").iterdir() if d.is_dir()]  # beside it: the hidden build lock
    assert (cache / "stats.json").is_file() and out.strip().endswith(str(cache))
    caplog.clear()
    assert run("fit", "--config", str(cfg), "--trainer.max_steps", "1", "--trainer.val_check_interval", "1") == 0
    assert f"using cached splits {cache}" in caplog.text


def test_out_of_memory_is_one_line_naming_the_batch_settings(cfg, capsys):
    assert run("fit", "--config", str(cfg), "--trainer.callbacks+=tests.helpers.RaiseOutOfMemory") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of GPU memory at data.batch_size 4" in err and "--data.max_tokens" in err


def test_out_of_memory_backoff_halves_the_micro_batch_and_keeps_the_loss_curve(cfg, tmp_path, caplog):
    args = ("fit", "--config", str(cfg), "--model.lora.dropout", "0")  # dropout masks would differ per part
    assert run(*args, "--trainer.default_root_dir", str(tmp_path / "whole")) == 0
    # Batches of 4 on a "GPU" that holds 2: halved at the first step; at the second, the second part fails too
    # (after the first part's backward), so the step is retried in 4 parts with the first part's gradient undone.
    assert run(*args, "--model.oom_backoff", "true", "--trainer.callbacks+=tests.helpers.MemoryLimit",
               "--trainer.callbacks.rows=2", "--trainer.callbacks.also_at_call=5") == 0
    assert "each batch now runs in 2 parts" in caplog.text and "each batch now runs in 4 parts" in caplog.text
    expected, backed_off = scalars(tmp_path / "whole" / "version_0", "train/loss"), scalars(
        tmp_path / "runs" / "version_0", "train/loss")
    assert sorted(expected) == sorted(backed_off) == [0, 1, 2, 3, 4, 5]
    for step in expected:
        assert backed_off[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-5), step


def test_out_of_memory_backoff_is_refused_on_several_devices(cfg, capsys):
    assert run("fit", "--config", str(cfg), "--model.oom_backoff", "true", "--trainer.devices", "2") == 2
    err = capsys.readouterr().err
    assert "model.oom_backoff works on one device" in err and err.count("\n") == 1


def test_training_graphs_settings_they_cannot_replay_are_refused_before_loading(cfg, capsys):
    for flags, expected in ((["--data.packing", "false"], "needs data.packing true"),
                            (["--data.packing", "true", "--model.lora.dropout", "0.1"], "needs model.lora.dropout 0")):
        assert run("fit", "--config", str(cfg), "--model.backbone.training_graphs", "true", *flags) == 2
        err = capsys.readouterr().err
        assert f"model.backbone.training_graphs: {expected}" in err and err.count("\n") == 1


def test_checkpointing_can_be_switched_off(cfg, tmp_path):
    assert run("fit", "--config", str(cfg), "--trainer.max_steps", "2", "--trainer.enable_checkpointing", "false") == 0
    assert not list((tmp_path / "runs").rglob("*.ckpt"))
    assert (tmp_path / "runs" / "version_0" / "adapter" / "adapter_model.safetensors").is_file()


def test_the_untuned_baseline_is_measured_at_the_first_validation_without_delaying_training(cfg, tmp_path):
    """With no full validation before training, the first validation also scores the base with the adapter off
    and logs it at step 0: the same value and samples as a full validation before training gives."""
    before, later = tmp_path / "before", tmp_path / "later"
    assert run("fit", "--config", str(cfg), "--trainer.default_root_dir", str(before),
               "--trainer.num_sanity_val_steps", "-1") == 0
    assert run("fit", "--config", str(cfg), "--trainer.default_root_dir", str(later),
               "--trainer.num_sanity_val_steps", "0") == 0
    expected, measured = scalars(before / "version_0", "val/loss"), scalars(later / "version_0", "val/loss")
    assert sorted(expected) == sorted(measured) == [0, 2, 5]
    for step in expected:
        assert measured[step] == pytest.approx(expected[step], rel=1e-5), step
    assert sorted(scalars(later / "version_0", "train/loss")) == [0, 1, 2, 3, 4, 5]


def test_a_validation_interval_longer_than_the_epoch_is_one_line(cfg, capsys):
    assert run("fit", "--config", str(cfg), "--trainer.val_check_interval", "500",
               "--trainer.check_val_every_n_epoch", "1") == 2
    err = capsys.readouterr().err
    assert err.startswith("titlegen: error: `val_check_interval` (500)") and err.count("\n") == 1


@pytest.mark.parametrize("strategy", ["fsdp", "lightning.pytorch.strategies.FSDPStrategy"])
def test_fsdp_of_4bit_weights_is_one_line_before_loading(cfg, capsys, strategy):
    assert run("fit", "--config", str(cfg), "--trainer.strategy", strategy, "--trainer.devices", "2") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"titlegen: error: trainer.strategy {strategy} with model.backbone.quantization nf4")
    assert "--trainer.strategy ddp" in err and err.count("\n") == 1
