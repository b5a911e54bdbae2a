"""The whole pipeline on generated data: dogtl demo."""

from __future__ import annotations

from pathlib import Path

import typer

from dogtl import api
from dogtl.cli.common import friendly_errors
from dogtl.core.settings import with_options
from dogtl.demo_settings import DEMO_SETTINGS


@friendly_errors
@with_options(DEMO_SETTINGS)
def demo_cmd(settings: dict = None):
    """Run the whole pipeline on a small generated, clearly SYNTHETIC data set, in a few minutes.

    Writes procedurally drawn images in the Kaggle layout, then runs extract-features, train-head, finetune, evaluate and predict on them, printing where each artifact went.
    """
    result = api.demo(note=typer.echo, **settings)
    typer.echo(f"demo finished in {result.seconds:.0f} s ({Path(result.weights).name} weights). Artifacts:")
    for what, path in result.artifacts.items():
        typer.echo(f"  {what:22s} {path}")
