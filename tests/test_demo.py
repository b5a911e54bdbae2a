"""`dogtl demo` end to end at a reduced size, offline fallback included."""

from __future__ import annotations

import time

import pandas as pd
import pytest
from conftest import run_cli

from dogtl import demo
from dogtl.core.errors import DogtlError
from dogtl.demo_settings import DemoConfig

SMALL = dict(backbone="mobilenet_v2", image_size=32, classes=3, per_class=8, test_images=3, source_size=48,
             passes=1, head_epochs=3, finetune_epochs=1, batch_size=8)


def test_demo_runs_every_stage_offline_and_says_where_artifacts_went(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "weights_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(demo, "_cached_imagenet", lambda module: False)
    lines = []
    result = demo.run_demo(DemoConfig(dir=str(tmp_path / "demo"), **SMALL), note=lines.append)

    notes = [line for line in lines if line.startswith("note:")]
    assert len(notes) == 1 and "randomly initialised" in notes[0] and "offline" in notes[0]
    steps = [line for line in lines if line.startswith("[")]
    assert [s[:5] for s in steps] == [f"[{k}/6]" for k in range(1, 7)]
    assert "SYNTHETIC" in steps[0]
    assert lines[-1].startswith(f"try the model in a browser: dogtl serve {result.artifacts['fine-tuned model']}")
    assert result.weights.endswith("random_backbone.weights.h5")
    for what, path in result.artifacts.items():
        assert path.exists(), what
    for what in ("synthetic data set", "feature cache", "head model", "fine-tuned model", "evaluation report",
                 "submission"):
        assert any(str(result.artifacts[what]) in line for line in steps), what
    submission = pd.read_csv(result.artifacts["submission"])
    assert len(submission) == 3 and list(submission.columns)[0] == "id"
    assert set(result.metrics) == {"head", "finetune", "evaluate"}

    with pytest.raises(DogtlError, match="already holds a demo"):
        demo.run_demo(DemoConfig(dir=str(tmp_path / "demo"), **SMALL))


def test_weights_probe_gives_up_quickly(monkeypatch):
    monkeypatch.setattr(demo, "WEIGHTS_HOST", ("dogtl-no-such-host.invalid", 443))
    started = time.perf_counter()
    assert demo.weights_reachable(timeout=1.0) is False
    assert time.perf_counter() - started < 2.0


def test_demo_help():
    result = run_cli("demo", "--help")
    assert result.exit_code == 0 and "SYNTHETIC" in result.stdout
