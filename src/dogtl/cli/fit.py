"""From a folder of images to a model in a time budget: dogtl fit."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dogtl import api
from dogtl.cli.common import ImageProgress, command_started, friendly_errors, interactive
from dogtl.cli.head import auto_line
from dogtl.core.budget import format_seconds
from dogtl.core.backbones import backbone_help


class FitProgress:
    """One line per choice and finished step; a progress bar for the stages over images."""

    def __init__(self):
        self.auto_line = auto_line
        self.bar = None
        self.stage = None

    def echo(self, line: str) -> None:
        if self.bar is not None and not self.bar.progress.disable:
            self.bar.progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            typer.echo(line)

    def __call__(self, event: dict) -> None:
        if event["event"] == "images":
            if event["stage"] != self.stage:
                self.close()
                self.stage = event["stage"]
                if interactive():
                    self.bar = ImageProgress(self.stage).__enter__()
            if self.bar is not None:
                self.bar.update(event["done"], event["total"])
            return
        if event["event"] == "line":
            if not event["text"].startswith("finetune "):  # epoch lines keep the fine-tuning bar
                self.close()
            self.echo(event["text"])
            return
        line = self.auto_line(event)
        if line:
            self.echo(f"  {line}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
        self.bar, self.stage = None, None


@friendly_errors
def fit_cmd(
    data: Path = typer.Option(Path("data"), help="Data folder: Kaggle layout (labels.csv, train/, test/) or one sub-folder per class."),
    budget: str = typer.Option("30m", help="Wall-clock time the whole command may take, start-up included: 90s, 30m, 1h (a bare number is seconds)."),
    out: Path = typer.Option(Path("models/model.keras"), help="The final model (+ .json metadata); the work is kept beside it in OUT-without-.keras.fit/."),
    backbone: str = typer.Option("mobilenet_v2", help=backbone_help() + " The default is the cheapest per image: the most fine-tuning epochs in a budget on CPUs."),
    weights: str = typer.Option("imagenet", help="'imagenet' (downloaded by Keras), 'none' (random, for smoke tests) or PATH to a local no-top weights file."),
    image_size: Optional[int] = typer.Option(None, help="Input size in pixels. Default: the images' own (median) size rounded to 32 px, from 96 up to the backbone's own size."),
    passes: int = typer.Option(2, help="Augmented passes cached per image (light augmentation: rotation 10 degrees, zoom and shift 0.1)."),
    hflip: bool = typer.Option(True, "--hflip/--no-hflip", help="Mirror images in augmentation (turn off for digits, text, anything with a handedness)."),
    val_fraction: float = typer.Option(0.1, help="Stratified validation fraction: what fit chooses on and reports."),
    seed: int = typer.Option(2018, help="Seed of the split, augmentation and search."),
    trials: Optional[int] = typer.Option(None, help="At most this many head-search trials (default: as many as its share of the budget allows)."),
    epochs: Optional[int] = typer.Option(None, help="At most this many fine-tuning epochs (default: as many as the budget allows)."),
    force: bool = typer.Option(False, "--force", help="Start over: replace --out and discard the work folder of an earlier fit."),
):
    """The strongest model a time budget allows, from a folder of images, in one command.

    Extracts the feature cache, searches the head (train-head --auto), fine-tunes the backbone with it, and evaluates, each within its share of --budget; prints what it chose and why. Killed or interrupted, the same command reuses the finished stages and resumes the unfinished one.
    """
    report = FitProgress()
    try:
        r = api.fit(data, budget=budget, out=out, backbone=backbone, weights=weights, image_size=image_size,
                    passes=passes, hflip=hflip, val_fraction=val_fraction, seed=seed, trials=trials, epochs=epochs,
                    force=force, progress=report,
                    started=command_started())
    finally:
        report.close()
    typer.echo(f"validation accuracy {r.metrics['val_accuracy']:.4f}  log loss {r.metrics['val_log_loss']:.4f}"
               f"  (the head before fine-tuning: {r.head_metrics['val_accuracy']:.4f}, "
               f"{r.head_metrics['val_log_loss']:.4f})")
    typer.echo(f"wrote {r.model_path} (+ {r.model_path.with_suffix('.json').name}) in {format_seconds(r.seconds)} "
               f"of a {format_seconds(r.budget)} budget; the work is in {r.folder}")
