"""dogtl fit: one command from images to a model within a time budget, resumable after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import assert_clean_error, run_cli

def _fit_args(stage3, out, budget, data=None):
    """stage3's data and backbone (mobilenet_v2 at 48 px, a small weights file: cheap to checkpoint)."""
    return ["fit", "--data", data or stage3.data, "--out", out, "--budget", budget, "--backbone", "mobilenet_v2",
            "--weights", stage3.weights, "--image-size", 48]


def _stages(out):
    path = out.with_suffix(".fit") / "fit.json"
    try:
        return json.loads(path.read_text())["stages"]
    except (OSError, ValueError):
        return {}


def test_fit_reuses_finished_stages_after_an_interruption(stage3, tmp_path):
    """Stopped after its extraction (Ctrl-C), fit run again reuses the cache, then searches the head,
    fine-tunes and evaluates within its budget, printing what it chose and why."""
    import dogtl

    out = tmp_path / "models" / "model.keras"

    def stop_after_extraction(event):
        if event.stage == "fit" and event.message.startswith("extract:"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dogtl.fit(stage3.data, out=out, budget="5m", progress=stop_after_extraction, backbone="mobilenet_v2",
                  weights=str(stage3.weights), image_size=48)
    assert list(_stages(out)) == ["extract"] and not out.exists()
    cache = out.with_suffix(".fit") / "features.h5"
    written = cache.stat().st_mtime_ns

    started = time.time()
    result = run_cli(*_fit_args(stage3, out, "5m"), "--trials", 1, "--epochs", 1)
    elapsed = time.time() - started
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "backbone mobilenet_v2 at 48 px: as requested"
    assert any(line.startswith("extract: reusing") for line in lines) and cache.stat().st_mtime_ns == written
    assert any(line.startswith("head search: ") for line in lines)
    assert any(line.startswith("  trial 0 fold 1/3: head linear") for line in lines)
    assert any(line.startswith("fine-tuning: ") and "planned from the measured" in line for line in lines)
    assert any(line.startswith("final model: ") for line in lines)
    assert "None" not in result.stdout
    assert elapsed <= 300, (elapsed, result.output)
    assert set(_stages(out)) == {"extract", "head", "finetune", "evaluate"}
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["kind"] == "finetuned" and meta["image_size"] == 48
    assert f"{meta['metrics']['val_log_loss']:.4f}" in lines[-2]


def test_fine_tuning_is_planned_to_end_before_the_deadline():
    """The planned epochs leave 1 - PLAN_SHARE of the time: a cut schedule ends at a high rate."""
    from dogtl.fitting import FINETUNE_COST, MAX_EPOCHS, PLAN_SHARE, plan_epochs

    epochs, per_epoch = plan_epochs(50.0, train_images=100, val_images=10, rate=(100 * FINETUNE_COST + 10) / 10)
    assert per_epoch == 10.0 and epochs == int(PLAN_SHARE * 5) < 5 <= MAX_EPOCHS  # not the 5 that fill all 50 s
    assert plan_epochs(5.0, 100, 10, 41.0)[0] == 0 and plan_epochs(1e6, 100, 10, 41.0)[0] == MAX_EPOCHS


def test_fine_tuning_is_replanned_from_its_first_training_steps(monkeypatch, tmp_path):
    """The plan from extraction's speed was MAX_EPOCHS (an OpenVINO extraction far faster than
    training); the first PROBE_IMAGES images trained at 3.2 images/s, so fit starts again with the
    epochs that fit, and says so. Fine-tuning itself is replaced by its progress events on a fake
    clock: the test is of the planning, which runs the same either way."""
    from types import SimpleNamespace

    import dogtl.fitting as fitting
    from dogtl.core.budget import Deadline
    from dogtl.core.progress import ProgressEvent
    from dogtl.fit_settings import FitConfig
    from dogtl.fitstate import FitState

    clock, calls, lines = [1000.0], [], []
    monkeypatch.setattr(fitting.time, "time", lambda: clock[0])

    def finetune(config, progress=None):
        calls.append(config.epochs)
        total = 640 * config.epochs
        for done in range(32, total + 1, 32):  # a batch of 32 images in 10 s
            clock[0] += 10.0
            progress(ProgressEvent("finetune", done, total))
        return SimpleNamespace(after={"val_log_loss": 0.3}, before={"val_log_loss": 0.5}, best_epoch=config.epochs,
                               epochs_run=config.epochs, seconds=total / 3.2)

    monkeypatch.setattr(fitting, "finetune", finetune)
    config = FitConfig(data=str(tmp_path), out=str(tmp_path / "m.keras"), budget=1200)
    state = FitState(config.folder, {"test": 1}, force=False)
    head = {"train_images": 640, "val_images": 64, "model": str(tmp_path / "h.keras")}
    end = Deadline.after(config.budget, clock[0])
    record = fitting._finetune(config, state, end, {"rate": 1e4}, head, None, lines.append, [])
    first, then = calls
    assert first == fitting.MAX_EPOCHS and then == 4  # (1,000 s left - 20 s set-up) * 0.85 / 205 s an epoch
    assert any(line.startswith(f"fine-tuning: replanned to {then} epoch(s)") for line in lines), lines
    assert record["epochs_run"] == then and state.data["plan"]["epochs"] == then
    assert end.left() > 0  # the replanned schedule ended within the budget


def test_fit_refuses_bad_input_in_one_line(stage3, tmp_path):
    out = tmp_path / "m.keras"
    assert_clean_error(run_cli(*_fit_args(stage3, out, "forever")), "--budget 'forever'")
    assert_clean_error(run_cli(*_fit_args(stage3, out, "1m", data=tmp_path / "nothing")), "nothing")
    assert_clean_error(run_cli(*_fit_args(stage3, tmp_path / "m.h5", "1m")), "m.h5", ".keras")


@pytest.mark.slow
def test_fit_resumes_after_kill_9(stage3, tmp_path):
    """A real SIGKILL in the middle of the head search; the rerun reuses the extraction and the
    search's finished trials, and finishes."""
    out = tmp_path / "model.keras"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "dogtl.cli", *map(str, _fit_args(stage3, out, "10m"))],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    study = out.with_suffix(".fit") / "head.auto" / "study.db"
    deadline = time.time() + 300
    while not ("extract" in _stages(out) and study.exists()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(3)  # into the search
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(_stages(out)) == ["extract"], proc.stdout.read()
    result = run_cli(*_fit_args(stage3, out, "5m"), "--trials", 2, "--epochs", 1)
    assert result.exit_code == 0, result.output
    assert "extract: reusing" in result.stdout and out.exists()
    assert set(_stages(out)) == {"extract", "head", "finetune", "evaluate"}
