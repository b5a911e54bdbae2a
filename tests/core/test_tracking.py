"""Experiment tracking (`--track`) against a real `mlflow server` on loopback, read back through
MlflowClient: runs, params, per-epoch metric histories, child runs and artifacts. No mock."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import assert_clean_error, run_cli

mlflow = pytest.importorskip("mlflow")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on a free loopback port with its own SQLite store and artifact folder."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no background job workers
    deadline = time.monotonic() + 240
    try:
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
                time.sleep(0.2)
        yield url
    finally:  # a throwaway server: no graceful shutdown to wait for
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log.close()


@pytest.fixture
def experiment(server, monkeypatch, request):
    """This test's own experiment on the server; returns a function listing its runs."""
    name = f"test-{request.node.name}-{time.time_ns()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name)
    client = mlflow.MlflowClient(server)

    def runs():
        found = client.get_experiment_by_name(name)
        return client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"]) if found else []
    runs.client = client
    return runs


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def artifacts(client, run_id: str) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id)}


def test_train_head_run_holds_settings_epochs_result_and_files(experiment, small_cache, tmp_path, caplog):
    out = tmp_path / "head.keras"
    with caplog.at_level(logging.INFO, "dogtl.core.tracking"):
        result = run_cli("train-head", "--cache", small_cache, "--out", out, "--epochs", 3, "--hidden", 8,
                         "--max-lr", 2e-3, "--track")
    assert result.exit_code == 0, result.output
    [run] = experiment()
    client = experiment.client
    assert run.info.run_name == "train-head head.keras" and run.info.status == "FINISHED"
    assert run.data.tags["dogtl.command"] == "train-head"
    assert any(run.info.run_id in r.getMessage() for r in caplog.records)  # where the run went is said
    params = run.data.params
    assert params["epochs"] == "3" and params["hidden"] == "[8]" and params["max_lr"] == "0.002"
    assert params["cache"] == str(small_cache) and int(params["resolved.batch_size"]) > 0
    saved = json.loads(out.with_suffix(".json").read_text())
    rows = (out.with_suffix(".history.csv")).read_text().splitlines()[1:]
    val_loss = history(client, run.info.run_id, "epoch/val_loss")
    assert [step for step, _ in val_loss] == list(range(1, len(rows) + 1))
    assert val_loss[-1][1] == pytest.approx(float(rows[-1].split(",")[3]))
    assert run.data.metrics["val_log_loss"] == pytest.approx(saved["metrics"]["val_log_loss"])
    assert run.data.metrics["best_epoch"] == saved["metrics"]["best_epoch"]
    assert artifacts(client, run.info.run_id) == {"head.keras", "head.json", "head.history.csv", "head.png"}
    copy = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="head.keras",
                                               dst_path=str(tmp_path / "down"), tracking_uri=client.tracking_uri)
    assert hashlib.sha256(Path(copy).read_bytes()).digest() == hashlib.sha256(out.read_bytes()).digest()


def test_sweep_trials_are_child_runs(experiment, small_cache, tmp_path):
    import dogtl

    result = dogtl.sweep(small_cache, params=["max_lr=1e-3,3e-3", "hidden=8"], epochs=2, out=tmp_path / "sweep",
                         progress=False, track=True)
    runs = experiment()
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and len(children) == 2
    assert parent.info.run_name == "sweep sweep" and parent.data.params["params"] == "['max_lr=1e-3,3e-3', 'hidden=8']"
    assert parent.data.metrics["val_log_loss"] == pytest.approx(result.results.iloc[0]["val_log_loss"])
    assert artifacts(experiment.client, parent.info.run_id) == {"results.csv", "best.toml", "sweep.png"}
    frame = result.results.set_index("trial")
    assert {c.data.params["max_lr"] for c in children} == {"0.001", "0.003"}
    for child in children:
        assert child.info.status == "FINISHED" and child.data.params["epochs"] == "2"
        assert child.info.run_name == f"max_lr={float(child.data.params['max_lr']):g}"  # the searched values
        row = frame.loc[child.data.params["trial"]]
        assert child.data.metrics["val_log_loss"] == pytest.approx(row["val_log_loss"])
        steps = [s for s, _ in history(experiment.client, child.info.run_id, "epoch/loss")]
        assert steps == list(range(1, int(row["epochs_run"]) + 1))


def test_evaluate_run_holds_the_report(experiment, small_cache, tmp_path):
    import dogtl

    head = dogtl.train_head(cache=small_cache, out=tmp_path / "head.keras", epochs=2, hidden=(8,), progress=False)
    with mlflow.start_run(run_name="a notebook's own run") as outer:  # dogtl's run becomes its child
        report = dogtl.evaluate(head.model_path, progress=False, track=True)
    [_, run] = experiment()
    assert run.data.tags["mlflow.parentRunId"] == outer.info.run_id
    assert run.info.run_name == "evaluate head.keras" and run.data.params["model"] == str(head.model_path)
    assert run.data.metrics["val_accuracy"] == pytest.approx(report.accuracy)
    assert run.data.metrics["val_log_loss"] == pytest.approx(report.log_loss)
    assert artifacts(experiment.client, run.info.run_id) == {"head.eval.json", "head.eval.csv", "head.eval.png"}


@pytest.mark.slow
def test_finetune_run_starts_at_the_head(experiment, stage3, tmp_path):
    import dogtl

    result = dogtl.finetune(data=stage3.data, head=stage3.head, out=tmp_path / "finetuned.keras", epochs=2,
                            batch_size=8, patience=0, progress=False, track=True)
    [run] = experiment()
    client = experiment.client
    assert run.info.run_name == "finetune finetuned.keras" and run.data.params["trainable_blocks"] == "2"
    val_loss = history(client, run.info.run_id, "epoch/val_loss")
    assert val_loss[0] == (0, pytest.approx(result.before["val_log_loss"])) and [s for s, _ in val_loss] == [0, 1, 2]
    assert run.data.metrics["val_log_loss"] == pytest.approx(result.after["val_log_loss"])
    assert {"finetuned.keras", "finetuned.json", "finetuned.history.csv"} <= artifacts(client, run.info.run_id)


@pytest.mark.slow
def test_auto_trials_are_child_runs(experiment, small_cache, tmp_path):
    result = run_cli("train-head", "--cache", small_cache, "--out", tmp_path / "auto.keras", "--auto",
                     "--budget", 20, "--track")
    assert result.exit_code == 0, result.output
    runs = experiment()
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.run_name == "train-head --auto auto.keras" and parent.data.params["budget"] == "20.0"
    assert len(children) >= 2 and all(c.data.metrics.get("val_log_loss") is not None for c in children)
    assert {"auto.keras", "auto.json"} <= artifacts(experiment.client, parent.info.run_id)


def test_a_failed_stage_ends_its_run_failed_and_an_interrupted_one_killed(experiment, tmp_path):
    from dogtl.core import tracking

    result = run_cli("train-head", "--cache", tmp_path / "missing.h5", "--out", tmp_path / "h.keras", "--track")
    assert_clean_error(result, "missing.h5")
    with pytest.raises(KeyboardInterrupt), tracking.start("finetune", "interrupted", True):
        raise KeyboardInterrupt  # Ctrl-C, or SIGTERM as the commands receive it
    assert [(r.info.run_name, r.info.status) for r in experiment()] == [
        ("train-head h.keras", "FAILED"), ("interrupted", "KILLED")]


# -- without a server ----------------------------------------------------------------------------

@pytest.mark.slow
def test_without_a_uri_runs_go_to_mlflows_local_default(small_cache, tmp_path, monkeypatch):
    import dogtl

    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    dogtl.train_head(cache=small_cache, out="models/head.keras", epochs=1, hidden=(8,), progress=False, track=True)
    client = mlflow.MlflowClient(mlflow.get_tracking_uri())
    [run] = client.search_runs([client.get_experiment_by_name("dogtl").experiment_id])
    assert run.data.metrics["epochs_run"] == 1
    stored = {p.name for p in (tmp_path / "mlruns").rglob("head*")}  # MLflow >= 3.7: mlflow.db + mlruns/
    assert (tmp_path / "mlflow.db").exists() and {"head.keras", "head.json"} <= stored


def test_tracking_off_never_imports_mlflow_and_on_without_it_says_what_to_install(small_cache, tmp_path, monkeypatch):
    import dogtl

    monkeypatch.setitem(sys.modules, "mlflow", None)  # any `import mlflow` now fails
    dogtl.train_head(cache=small_cache, out=tmp_path / "head.keras", epochs=1, hidden=(8,), progress=False)
    result = run_cli("train-head", "--cache", small_cache, "--out", tmp_path / "h2.keras", "--track")
    assert_clean_error(result, r"--track needs MLflow: pip install 'dogtl\[track\]'")
    assert not (tmp_path / "h2.keras").exists()


def test_an_unreachable_server_stops_before_any_work(small_cache, tmp_path, monkeypatch):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    result = run_cli("train-head", "--cache", small_cache, "--out", tmp_path / "h.keras", "--track")
    assert_clean_error(result, f"--track: cannot start an MLflow run at {url}", "MLFLOW_TRACKING_URI")
    assert not (tmp_path / "h.keras").exists()


def test_a_tracking_failure_mid_run_warns_once_and_spares_the_work(tmp_path, monkeypatch, caplog):
    from dogtl.core.tracking import MlflowRun

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    run = MlflowRun(mlflow.MlflowClient(f"http://127.0.0.1:{free_port()}"), "0" * 32, "0")  # the server is gone
    (tmp_path / "model.keras").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, "dogtl.core.tracking"):
        run.epoch({"epoch": 1, "loss": 0.5})
        run.result({"val_log_loss": 0.4}, [tmp_path / "model.keras"])
        with run.child("trial") as child:
            child.epoch({"epoch": 1, "loss": 0.5})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "MLflow tracking stopped for run" in warnings[0]
