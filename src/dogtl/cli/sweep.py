"""Many heads on one cache: dogtl sweep."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from dogtl import api
from dogtl.cli.common import TRACK_OPTION, _RichBar, friendly_errors, interactive, show_tracking
from dogtl.cli.head import cache_arg
from dogtl.core.budget import format_seconds
from dogtl.core.progress import ProgressEvent
from dogtl.core.settings import with_options
from dogtl.sweeps.settings import SWEEP_SETTINGS


class TrialProgress(_RichBar):
    """A rich progress bar across a sweep's trials (fed by run_sweep's ProgressEvents), with
    one line per finished trial above it."""

    def __init__(self, unit: str, folds: int = 1):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn(f"sweep ({unit})"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("best {task.fields[best]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), disable=not interactive())
        self.task = None
        self.folds = folds
        self.started = None  # (time, runs done) at the first event: the ETA of plain lines

    def __call__(self, event: ProgressEvent):
        d = event.detail
        best = f"{d['best']:.4f}" if d["best"] != float("inf") else "-"
        if self.task is None:
            self.started = (time.monotonic(), event.done)
            self.task = self.progress.add_task("sweep", total=event.total, completed=event.done, best=best)
            if d["skipped"]:
                self.echo(f"resuming: {d['skipped']} of {event.total} runs already finished")
        self.progress.update(self.task, completed=event.done, best=best)
        r = d["record"]
        if r is not None:
            m = r["metrics"]
            fold = f" fold {r['fold'] + 1}" if self.folds > 1 else ""
            result = (f"error: {r['error']}" if r.get("error") else
                      f"val log loss {m['val_log_loss']:.4f}  acc {m['val_accuracy']:.4f}  "
                      f"{m['epochs_run']} epochs")
            self.echo(f"[{event.done}/{event.total}] {d['label']}{fold}: {result}  {r['seconds']:.1f} s"
                      + (self._eta(event.done, event.total) if self.progress.disable else ""))

    def _eta(self, done: int, total: int) -> str:
        """Where no bar shows it (logs): the time left at this session's rate."""
        since, first = self.started
        elapsed = time.monotonic() - since
        if done <= first or done >= total or elapsed <= 0:
            return ""
        return f"  (ETA {format_seconds((total - done) * elapsed / (done - first))})"



@friendly_errors
@with_options(SWEEP_SETTINGS)
def sweep_cmd(
    cache: list[Path] = typer.Option([Path("cache/features.h5")], help="Feature cache written by extract-features; repeat it to concatenate several caches of the same images per row."),
    param: Optional[list[str]] = typer.Option(None, "--param", help="name=v1,v2,... (repeatable; replaces the file's entry): any train-head setting (hidden=512,1024x512,none; max_lr=1e-3,3e-3; optimizer=adam,rmsprop; ...) or layers=1,2; name=low..high or name=log:low..high is a range."),
    track: bool = TRACK_OPTION,
    settings: dict = None,
):
    """Train many heads on the cached features and rank their settings by validation log loss.

    Grid search over every combination, or random search with --trials N. Writes OUT/results.csv (best first: settings, validation log loss and accuracy with their spread over folds, epochs run, seconds), OUT/best.toml (use it: dogtl train-head --config OUT/best.toml), OUT/sweep.png (each parameter against validation log loss). Every finished trial is saved as it ends: interrupted, the same command resumes.
    """
    show_tracking(track)
    folds = settings["folds"]
    with TrialProgress("trials" if not folds else "trial folds", folds or 1) as bar:
        result = api.sweep(cache_arg(cache), params=param or (), track=track, progress=bar, **settings)
    frame = result.results
    typer.echo(f"{result.trials} trials ({result.runs} runs now, {result.skipped} finished before) "
               f"in {result.seconds:.0f} s" + (f"; {len(result.dropped)} combinations skipped (train-head refuses "
                                               f"them, e.g. {result.dropped[0]})" if result.dropped else ""))
    shown = [c for c in frame.columns if c not in ("trial", "folds", "error", "best_epoch")
             and not (c.endswith("_std") and not folds)]
    typer.echo(frame[shown].head(10).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if result.best_path is None:
        typer.echo("every trial diverged: lower the learning rates")
        raise typer.Exit(1)
    typer.echo(f"wrote {result.results_path}, {result.best_path}, {result.plot_path}")
    typer.echo(f"train the best: dogtl train-head --config {result.best_path}")
    e = result.ensemble
    if e is not None:
        best = e.member_metrics[0]
        typer.echo(f"ensemble of the top {len(e.members)} trials, retrained: validation log loss "
                   f"{e.metrics['val_log_loss']:.4f}, accuracy {e.metrics['val_accuracy']:.4f} (best single trial "
                   f"retrained: {best['val_log_loss']:.4f}, {best['val_accuracy']:.4f}); wrote {e.model_path}")
