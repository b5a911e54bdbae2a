"""Using a trained model on the command line: evaluate and predict."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dogtl import api
from dogtl.cli.common import (MODEL_DEFAULT, TRACK_OPTION, ImageProgress, chosen_model, friendly_errors, model_argument,
                              model_option, show_tracking)
from dogtl.core.settings import with_options
from dogtl.evaluation.settings import EVALUATE_SETTINGS, PREDICT_SETTINGS


@friendly_errors
@with_options(EVALUATE_SETTINGS)
def evaluate_cmd(
    model: Optional[Path] = model_argument("Head or fine-tuned model to evaluate on the validation split"),
    model_opt: Optional[Path] = model_option(),
    track: bool = TRACK_OPTION,
    settings: dict = None,
):
    """Report accuracy, log loss, top-k accuracy, per-class accuracy and the most confused pairs.

    On the validation split stored in the cache. Writes a JSON report, a per-class CSV and a PNG of the confusion among the most confused classes.
    """
    model = chosen_model(model, model_opt)
    show_tracking(track)
    with ImageProgress("evaluating") as bar:
        r = api.evaluate(model, progress=bar, track=track, **settings)
    typer.echo(f"{r.model} on {r.images} validation images ({r.source}{f', {r.runtime}' if r.runtime else ''}):")
    typer.echo(f"  accuracy {r.accuracy:.4f}   log loss {r.log_loss:.4f}   top-{r.top_k} accuracy {r.top_k_accuracy:.4f}"
               + ("   (plain)" if r.tta else ""))
    if r.tta:
        typer.echo(f"  accuracy {r.tta['accuracy']:.4f}   log loss {r.tta['log_loss']:.4f}   top-{r.top_k} accuracy "
                   f"{r.tta['top_k_accuracy']:.4f}   (TTA over {r.tta['passes']} passes)")
    worst = r.per_class.dropna().sort_values("accuracy").head(5)
    typer.echo("  lowest per-class accuracy: " + ", ".join(
        f"{row['class']} {row['accuracy']:.2f} ({row['correct']}/{row['images']})" for _, row in worst.iterrows()))
    if r.confused:
        typer.echo("  most confused (true -> predicted):")
        for pair in r.confused:
            typer.echo(f"    {pair['true']} -> {pair['predicted']}: {pair['count']} ({pair['fraction']:.0%} of {pair['true']})")
    typer.echo(f"wrote {r.json_path}, {r.csv_path}, {r.png_path}")


@friendly_errors
@with_options(PREDICT_SETTINGS)
def predict_cmd(
    files: Optional[list[Path]] = typer.Argument(None, metavar="MODEL|IMAGE", show_default=False, help=f"The model (a .keras file; {MODEL_DEFAULT}), then image files: print their top classes instead of writing a submission."),
    model_opt: Optional[Path] = model_option(),
    settings: dict = None,
):
    """Write a Kaggle submission for the test images, or print the top classes of IMAGES.

    With a fine-tuned model the test images are read; with a head model the cache's test features are used when they are there (seconds). Columns are 'id' then the classes in the order of sample_submission.csv (sorted names when there is none); every row is clipped to [1e-15, 1] and renormalised to sum to 1. Unreadable test images are listed on stderr and, by default, skipped: the submission is complete for every other image (see --on-bad-image).
    """
    files = list(files or [])
    model = chosen_model(files.pop(0) if files and files[0].suffix == ".keras" else None, model_opt)
    images = files
    options = dict(model=model, **settings)
    if images:
        with ImageProgress("predicting") as bar:
            results = api.predict(images, progress=bar, **options)
        for r in results:
            if r.error:
                typer.secho(f"{r.path}: cannot read image ({r.error})", err=True, fg=typer.colors.YELLOW)
                continue
            typer.echo(r.path)
            for name, p in zip(r.classes, r.probabilities):
                typer.echo(f"  {p:7.2%}  {name}")
        if any(r.error for r in results):
            raise typer.Exit(1)
        return
    with ImageProgress("predicting") as bar:
        s = api.predict(progress=bar, **options)
    for line in s.skipped:
        path, _, reason = line.partition("\t")
        typer.secho(f"  {'uniform row for' if s.filled else 'skipped'} {path}: {reason}", err=True,
                    fg=typer.colors.YELLOW)
    typer.echo(f"wrote {s.path}: {s.rows} rows x {len(s.columns)} classes from {s.model} "
               f"({s.source}{f' on {s.runtime}' if s.runtime else ''}, {s.passes} pass{'es' if s.passes > 1 else ''})"
               + (f"; {len(s.skipped)} unreadable test image(s) {'filled uniformly' if s.filled else 'left out'}"
                  if s.skipped else ""))
