"""Metrics and the one report writer."""

from types import SimpleNamespace

import pytest

from titlegen.eval.metrics import has_loop, paired_bootstrap
from titlegen.eval.report import METRICS, markdown


def test_loop_detection_and_bootstrap():
    assert has_loop("the best mug ever the best mug ever the best mug ever")
    assert not has_loop("the best mug ever, truly the best mug")
    same = paired_bootstrap([0.1, 0.2, 0.3], [0.1, 0.2, 0.3])
    assert same == {"mean": 0.0, "low": 0.0, "high": 0.0}
    better = paired_bootstrap([0.1] * 50, [0.2] * 50)
    assert better["low"] == pytest.approx(0.1) and better["high"] == pytest.approx(0.1)


def test_first_hour_11_report_markdown_keeps_generated_text_on_its_line():
    rows = [{"title": "Mug", "content": "A mug."}]
    out = SimpleNamespace(text="Great mug.\n### Response:\nBuy | now", stopped=True)
    md = markdown("t", {"generated": {k: 0.5 for k in METRICS}}, rows, {"generated": [out]}, [], 8)
    assert "\n### Response" not in md and "Great mug. ### Response: Buy \\| now" in md
    assert all(f"| {k} | 0.5000 |" in md for k in METRICS)
