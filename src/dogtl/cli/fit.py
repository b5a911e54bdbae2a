"""From a folder of images to a model in a time budget: dogtl fit."""

from __future__ import annotations

import typer

from dogtl import api
from dogtl.cli.common import ImageProgress, command_started, friendly_errors, interactive
from dogtl.core.budget import format_seconds
from dogtl.core.progress import ProgressEvent
from dogtl.core.settings import with_options
from dogtl.fit_settings import FIT_SETTINGS


class FitProgress:
    """One line per choice and finished step; a progress bar for the stages over images."""

    def __init__(self):
        self.bar = None
        self.stage = None

    def echo(self, line: str) -> None:
        if self.bar is not None and not self.bar.progress.disable:
            self.bar.progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            typer.echo(line)

    def __call__(self, event: ProgressEvent) -> None:
        if event.unit == "images":
            if event.stage != self.stage:
                self.close()
                self.stage = event.stage
                if interactive():
                    self.bar = ImageProgress(self.stage).__enter__()
            if self.bar is not None:
                self.bar.update(event.done, event.total)
            return
        line = event.line()
        if line is None:
            return
        if event.stage == "auto":  # the head search's trials, under fit's own line
            return self.echo(f"  {line}")
        if not line.startswith("finetune "):  # epoch lines keep the fine-tuning bar
            self.close()
        self.echo(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
        self.bar, self.stage = None, None


@friendly_errors
@with_options(FIT_SETTINGS)
def fit_cmd(settings: dict):
    """The strongest model a time budget allows, from a folder of images, in one command.

    Extracts the feature cache, searches the head (train-head --auto), fine-tunes the backbone with it, and evaluates, each within its share of --budget; prints what it chose and why. Killed or interrupted, the same command reuses the finished stages and resumes the unfinished one.
    """
    report = FitProgress()
    try:
        r = api.fit(progress=report, started=command_started(), **settings)
    finally:
        report.close()
    typer.echo(f"validation accuracy {r.metrics['val_accuracy']:.4f}  log loss {r.metrics['val_log_loss']:.4f}"
               f"  (the head before fine-tuning: {r.head_metrics['val_accuracy']:.4f}, "
               f"{r.head_metrics['val_log_loss']:.4f})")
    typer.echo(f"wrote {r.model_path} (+ {r.model_path.with_suffix('.json').name}) in {format_seconds(r.seconds)} "
               f"of a {format_seconds(r.budget)} budget; the work is in {r.folder}")
