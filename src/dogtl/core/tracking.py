"""Experiment tracking: what a stage ran with and what it gave, sent to MLflow (`--track`).

Stages report to a `Run`, a narrow observer: `params` once, `epoch` rows (each at its step),
the `result` (the kept model's metrics and its files) and `child` runs (a sweep's trials). With
tracking off a stage gets `Run()`, which records nothing, and mlflow is never imported.

With it on, runs go where MLflow sends them: `MLFLOW_TRACKING_URI` (a tracking server, a
database) or, unset, MLflow's own default (since MLflow 3.7: `sqlite:///mlflow.db` in the working
folder with artifacts under `./mlruns`, or `./mlruns` alone where it already holds runs; `mlflow
ui` in that folder shows them). The experiment is `MLFLOW_EXPERIMENT_NAME` (or `_ID`), else
"dogtl". A run started inside an active MLflow run (a notebook's `mlflow.start_run()`) is its child.

Metric names: per-epoch series under `epoch/` (`epoch/val_loss`, step = epoch), and the saved
model's figures without a prefix (`val_log_loss`, `val_accuracy`: the runs table's columns).
Failing to reach the tracking server at the start stops the command before any work; a
tracking error after that is logged as a warning and ends tracking for the run, never the work.
"""

from __future__ import annotations

import io
import logging
import os
import time
from contextlib import contextmanager, nullcontext, redirect_stdout
from pathlib import Path
from typing import Iterable, Iterator

from dogtl.core.errors import DogtlError
from dogtl.core.version import __version__

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "dogtl"
EPOCH_PREFIX = "epoch/"
INSTALL_HINT = "pip install 'dogtl[track]'"


class Run:
    """A run that records nothing: what the stages report to when tracking is off."""

    id: str | None = None

    def params(self, values: dict) -> None:
        """The settings the stage ran with (flat or nested dicts; values become strings)."""

    def epoch(self, row: dict, step: int | None = None) -> None:
        """One epoch's numbers, at `step` (default: the row's `epoch`)."""

    def history(self, rows: Iterable[dict]) -> None:
        for row in rows:
            self.epoch(row)

    def result(self, metrics: dict, files: Iterable = ()) -> None:
        """The kept model's numbers (non-numbers are left out) and the files the stage wrote."""

    def tags(self, values: dict) -> None:
        """Labels of the run (`mlflow.runName` renames it)."""

    @contextmanager
    def child(self, name: str, params: dict | None = None) -> Iterator["Run"]:
        """A run nested in this one (a sweep's trial)."""
        yield Run()


def flatten(values: dict, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}: MLflow params are flat strings."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(list(value) if isinstance(value, tuple) else value)
    return flat


def numbers(values: dict, prefix: str = "") -> dict[str, float]:
    """The numeric entries of `values` as floats, NaN included (bools, text and None left out)."""
    return {f"{prefix}{k}": float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class MlflowRun(Run):
    """A run in MLflow, written through one MlflowClient by run id (no global active run)."""

    def __init__(self, client, run_id: str, experiment_id: str):
        self.client, self.id, self.experiment_id = client, run_id, experiment_id
        self.failed = False

    def _send(self, what: str, call, *args, **kwargs) -> None:
        if self.failed:
            return
        try:
            call(*args, **kwargs)
        except Exception as e:  # the work goes on; its outputs are on disk either way
            self._stop(what, e)

    def _stop(self, what: str, error: Exception) -> None:
        self.failed = True
        log.warning("MLflow tracking stopped for run %s: cannot log its %s (%s)", self.id, what, first_line(error))

    def _batch(self, what: str, metrics: dict | None = None, params: dict | None = None, step: int = 0,
               tags: dict | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        self._send(what, self.client.log_batch, self.id,
                   metrics=[Metric(k, v, now, step) for k, v in (metrics or {}).items()],
                   params=[Param(k, v[:6000]) for k, v in (params or {}).items()],
                   tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])

    def params(self, values: dict) -> None:
        self._batch("settings", params=flatten(values))

    def epoch(self, row: dict, step: int | None = None) -> None:
        self._epochs([(int(row["epoch"] if step is None else step), row)])

    def history(self, rows: Iterable[dict]) -> None:  # one request for the whole history
        self._epochs([(int(row["epoch"]), row) for row in rows])

    def _epochs(self, rows: list[tuple[int, dict]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for step, row in rows
                   for k, v in numbers({k: v for k, v in row.items() if k != "epoch"}, EPOCH_PREFIX).items()]
        self._send("per-epoch metrics", self.client.log_batch, self.id, metrics=metrics)

    def result(self, metrics: dict, files: Iterable = ()) -> None:
        self._batch("result", metrics=numbers(metrics))
        for path in files:
            if path is not None and Path(path).is_file():
                self._send(f"file {path}", self.client.log_artifact, self.id, str(path))

    def tags(self, values: dict) -> None:
        self._batch("tags", tags=values)

    @contextmanager
    def child(self, name: str, params: dict | None = None) -> Iterator[Run]:
        if self.failed:
            yield Run()
            return
        try:
            run = _create(self.client, self.experiment_id, name, self.id)
        except Exception as e:
            self._stop(f"child run {name!r}", e)
            yield Run()
            return
        with _ending(run, quiet=True):
            if params:
                run.params(params)
            yield run


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def _create(client, experiment_id: str, name: str, parent: str | None, tags: dict | None = None) -> MlflowRun:
    tags = {"dogtl.version": __version__, **(tags or {}),
            **({"mlflow.parentRunId": parent} if parent else {})}
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    return MlflowRun(client, run.info.run_id, experiment_id)


@contextmanager
def _ending(run: MlflowRun, quiet: bool = False) -> Iterator[MlflowRun]:
    """FINISHED when the block ends, KILLED on Ctrl-C or SIGTERM, FAILED on an error. `quiet`:
    without the link to the run that MLflow prints for a server's runs (a sweep's trials)."""
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        with redirect_stdout(io.StringIO()) if quiet else nullcontext():
            run._send("end", run.client.set_terminated, run.id, status)


def _experiment(client) -> tuple[str, str]:
    """(id, name) of the experiment runs go to, created on first use."""
    experiment_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if experiment_id:
        return experiment_id, client.get_experiment(experiment_id).name
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id, name
    try:
        return client.create_experiment(name), name
    except Exception:  # created meanwhile by another process
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id, name


def tee(*callbacks):
    """One callback calling each of `callbacks` that is callable (None if none is): a stage's
    progress callback shared by its progress bar and its tracked run."""
    live = [c for c in callbacks if callable(c)]
    return (lambda *args: [c(*args) for c in live] and None) if live else None


def model_files(model) -> list[Path]:
    """A saved model and what dogtl writes beside it: metadata, history, plot."""
    model = Path(model)
    return [model, *(model.with_suffix(ext) for ext in (".json", ".history.csv", ".png"))]


def trial_observer(run: Run, folds: int | None = None):
    """A sweep's progress callback (`dogtl.sweeps.run.run_sweep`) logging each finished
    (trial, fold) as a child run of `run`: its settings, per-epoch history and scores."""
    def on_event(event) -> None:
        record = event.detail["record"]
        if record is None:
            return
        fold = f" fold {record['fold'] + 1}" if folds else ""
        with run.child(f"{event.detail['label'] or record['trial']}{fold}",
                       {**record["settings"], "fold": record.get("fold", 0), "trial": record["trial"]}) as child:
            child.history(record.get("history") or [])
            child.result({**record["metrics"], "seconds": record.get("seconds")})
            if record.get("error"):
                child.tags({"dogtl.error": record["error"]})
    return on_event


def fold_observer(run: Run):
    """`train-head --auto`'s progress callback (`dogtl.sweeps.auto`) logging each finished or
    pruned (trial, fold) as a child run of `run`: its settings and scores."""
    def on_event(progress_event) -> None:
        event = progress_event.detail or {}
        if event.get("event") not in ("fold", "pruned"):
            return
        with run.child(f"trial {event['trial']} fold {event['fold']}",
                       {"settings": event["settings"], "trial": event["trial"], "fold": event["fold"]}) as child:
            child.result({"val_log_loss": event["loss"],
                          **{k: event[k] for k in ("accuracy", "epochs", "seconds", "epoch") if k in event}})
            if event["event"] == "pruned":
                child.tags({"dogtl.pruned": "true"})
    return on_event


def where() -> str:
    """The tracking URI runs go to, as MLflow resolves it."""
    import mlflow

    return mlflow.get_tracking_uri()


@contextmanager
def start(command: str, name: str, enabled: bool, params: dict | None = None) -> Iterator[Run]:
    """A tracked run of `command` called `name` with `params`, if `enabled`; else `Run()`.
    Its status ends FINISHED, FAILED (an error) or KILLED (Ctrl-C, SIGTERM)."""
    if not enabled:
        yield Run()
        return
    try:
        import mlflow
    except ImportError:
        raise DogtlError(f"--track needs MLflow: {INSTALL_HINT}") from None
    uri = where()
    try:
        client = mlflow.MlflowClient()
        experiment_id, experiment = _experiment(client)
        active = mlflow.active_run()
        run = _create(client, experiment_id, name, active.info.run_id if active else None,
                      {"dogtl.command": command})
    except Exception as e:
        raise DogtlError(f"--track: cannot start an MLflow run at {uri} ({first_line(e)}); check "
                         "MLFLOW_TRACKING_URI or leave out --track") from None
    log.info("tracking to MLflow at %s: experiment %r, run %r (%s)", uri, experiment, name, run.id)
    with _ending(run):
        if params:
            run.params(params)
        yield run
