"""The whole pipeline on generated data: dogtl demo."""

from __future__ import annotations

from pathlib import Path

import typer

from dogtl import api
from dogtl.cli.common import friendly_errors
from dogtl.core.backbones import backbone_help


@friendly_errors
def demo_cmd(
    dir: Path = typer.Option(Path("demo"), "--dir", help="Folder for the demo's data, cache, models, reports and submission."),
    backbone: str = typer.Option("xception", help="Backbone to demonstrate. " + backbone_help()),
    image_size: int = typer.Option(71, help="Small input size so the demo runs in minutes on a CPU."),
    weights: str = typer.Option("auto", help="'auto' (ImageNet if it can be downloaded, else random initialisation), 'imagenet', 'none' or PATH."),
    force: bool = typer.Option(False, "--force", help="Redo a demo already in --dir (replaces its data, cache, models, reports)."),
):
    """Run the whole pipeline on a small generated, clearly SYNTHETIC data set, in a few minutes.

    Writes procedurally drawn images in the Kaggle layout, then runs extract-features, train-head, finetune, evaluate and predict on them, printing where each artifact went.
    """
    result = api.demo(dir, force=force, note=typer.echo, backbone=backbone, image_size=image_size, weights=weights)
    typer.echo(f"demo finished in {result.seconds:.0f} s ({Path(result.weights).name} weights). Artifacts:")
    for what, path in result.artifacts.items():
        typer.echo(f"  {what:22s} {path}")
