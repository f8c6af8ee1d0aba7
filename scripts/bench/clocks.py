"""A callback for scripts/benchmark.py: times optimizer steps after warm-up and writes one JSON result."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import lightning as L
import torch

from titlegen.model.backbone import count_parameters
from titlegen.model.callbacks import non_padding_tokens


def _gib(stat: str) -> float | None:
    """A ``torch.cuda`` memory statistic (``memory_allocated``, ``max_memory_reserved``, ...) in GiB; None without
    a GPU. Reserved memory counts CUDA graphs' pools, which allocated memory does not between recordings."""
    return round(getattr(torch.cuda, stat)() / 2**30, 2) if torch.cuda.is_available() else None


def _graphs_recorded(module) -> int | None:
    graphs = getattr(module, "_graphs", None)
    return None if graphs is None else graphs.recorded


class BenchClock(L.Callback):
    """Times steps ``warmup+1 ..`` (synchronized), counts non-padding and padded tokens, peak GPU memory.

    Args:
        result_file: Where the JSON result goes.
        warmup: Steps left out of the timing (allocation, autotuning, first-batch effects).
        peak_tflops: The GPU's bf16 matmul rate, for MFU (6N FLOP per token: forward, recompute, input grads).
        profile: Print the top CUDA kernels of one warm-up step.
    """

    def __init__(self, result_file: str, warmup: int = 4, peak_tflops: float = 800.0, profile: bool = False) -> None:
        self.result_file, self.warmup, self.peak, self.profile = Path(result_file), warmup, peak_tflops, profile
        self.marks: list[tuple[float, int, int]] = []
        self.tokens = self.padded = 0
        self._graphs_before = 0
        self._start_gib = _gib("memory_allocated")
        self._prof = None

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # A warm-up step: profiling slows the step it watches, so it must stay out of the timed window.
        if self.profile and batch_idx == max(0, self.warmup - 2) and self._prof is None:
            self._sync()
            self._prof_t0 = time.perf_counter()
            self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                            torch.profiler.ProfilerActivity.CUDA])
            self._prof.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.tokens += non_padding_tokens(batch)
        self.padded += batch["input_ids"].numel()
        self._sync()
        self.marks.append((time.perf_counter(), self.tokens, self.padded))
        if len(self.marks) == self.warmup:
            self._graphs_before = _graphs_recorded(pl_module)
        if self._prof is not None and batch_idx == max(0, self.warmup - 2):
            self._prof.__exit__(None, None, None)
            self._report_profile(time.perf_counter() - self._prof_t0)

    def _report_profile(self, wall: float) -> None:
        """Top kernels, top host-side ops, and how busy the GPU was over the profiled step."""
        trace = os.environ.get("TITLEGEN_TRACE")  # a Chrome trace of the step too (gzipped), for the timeline
        if trace:
            self._prof.export_chrome_trace(trace.removesuffix(".gz"))
            subprocess.run(["gzip", "-f", trace.removesuffix(".gz")], check=False)
        averages = self._prof.key_averages()
        print(averages.table(sort_by="self_cuda_time_total", row_limit=30), flush=True)
        print(averages.table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
        # As the table's "Self CUDA time total": device events, less the GPU-side ranges of user annotations
        # (e.g. "Optimizer.step#..."), which span other kernels and would count them twice.
        kernels = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA
                   and not getattr(e, "is_user_annotation", False)]
        busy = sum(e.self_device_time_total for e in kernels) / 1e6
        print(json.dumps({"profiled_step_s": round(wall, 3), "gpu_busy_s": round(busy, 3),
                          "gpu_busy_share": round(busy / wall, 3), "kernels": sum(e.count for e in kernels)}), flush=True)

    def on_train_end(self, trainer, pl_module) -> None:
        (t0, k0, p0), (t1, k1, p1) = self.marks[self.warmup - 1], self.marks[-1]
        seconds = t1 - t0
        n_params = count_parameters(pl_module.model)[1]
        tok_s = (k1 - k0) / seconds
        result = {
            "steps_timed": len(self.marks) - self.warmup,
            "s_per_step": round(seconds / (len(self.marks) - self.warmup), 3),
            "tokens_per_step": round((k1 - k0) / (len(self.marks) - self.warmup)),
            "tok_per_s": round(tok_s, 1),
            "padded_tok_per_s": round((p1 - p0) / seconds, 1),
            "peak_gib": _gib("max_memory_allocated"),
            "start_allocated_gib": self._start_gib,  # held before this run's model loaded (an earlier run's?)
            "peak_reserved_gib": _gib("max_memory_reserved"),
            "mfu": round(tok_s * 6 * n_params / (self.peak * 1e12), 4),
            "n_params": n_params,
            "final_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
        }
        if _graphs_recorded(pl_module) is not None:  # model.backbone.training_graphs: recordings in all, and timed
            result["graphs_recorded"] = _graphs_recorded(pl_module)
            result["graphs_recorded_timed"] = result["graphs_recorded"] - self._graphs_before
            result["graphs_record_s"] = round(pl_module._graphs.record_s, 1)
        self.result_file.write_text(json.dumps(result))


class PredictClock(L.Callback):
    """Times the predict loop (after model load and any merge), synchronized; writes titles/s and peak memory."""

    def __init__(self, result_file: str) -> None:
        self.result_file = Path(result_file)
        self.rows = self.new_tokens = 0
        self.t0 = 0.0

    def on_predict_start(self, trainer, pl_module) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.rows += len(outputs["row"])
        self.new_tokens += sum(o.num_tokens for o in outputs["outputs"])

    def on_predict_end(self, trainer, pl_module) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self.t0
        self.result_file.write_text(json.dumps({
            "titles": self.rows, "s": round(seconds, 2), "titles_per_s": round(self.rows / seconds, 2),
            "gen_tok_per_s": round(self.new_tokens / seconds, 1),
            "peak_gib": _gib("max_memory_allocated"),
            "peak_reserved_gib": _gib("max_memory_reserved"),
        }))
