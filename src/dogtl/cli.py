"""The `dogtl` command line: parses options, shows progress, prints, picks exit codes.

Everything heavy is imported inside the commands so `dogtl --help` stays instant.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    help="Transfer learning in three stages: extract-features (frozen backbone, once) -> "
         "train-head (seconds per epoch on cached features) -> finetune.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _quiet_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")


def fail(message: str, code: int = 2):
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def friendly_errors(command):
    """Known problems become one line on stderr and exit code 2; Ctrl-C keeps work."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        _quiet_tensorflow()
        try:
            return command(*args, **kwargs)
        except (ValueError, FileNotFoundError, FileExistsError) as e:
            fail(str(e))
        except KeyboardInterrupt:
            typer.secho("interrupted: finished work is kept; rerun the same command to resume",
                        err=True, fg=typer.colors.YELLOW)
            raise typer.Exit(130)
    return wrapper


@app.callback()
def _main():
    """Transfer learning in three stages, with a feature cache between them."""


@app.command("extract-features")
@friendly_errors
def extract_features_cmd(
    data: Path = typer.Option(Path("data"), help="Data folder: Kaggle layout (labels.csv, train/, test/) or one sub-folder per class."),
    cache: Path = typer.Option(Path("cache/features.h5"), help="HDF5 file to write the features to."),
    backbone: str = typer.Option("xception", help="xception, inception_v3, resnet50, mobilenet_v2 or efficientnet_b0."),
    weights: str = typer.Option("imagenet", help="'imagenet' (downloaded by Keras), 'none' (random, for smoke tests) or PATH to a local no-top weights file."),
    image_size: Optional[int] = typer.Option(None, help="Square input size in pixels (default: the backbone's own, 299 for xception)."),
    passes: int = typer.Option(5, help="Augmented passes over every labelled image, on top of the clean pass."),
    tta_passes: int = typer.Option(0, help="Augmented passes over test images, for test-time augmentation."),
    batch_size: int = typer.Option(32, help="Images per backbone call."),
    val_fraction: float = typer.Option(0.1, help="Stratified validation fraction, stored in the cache for every later stage."),
    seed: int = typer.Option(2018, help="Seed of the split and of every augmentation."),
    on_bad_image: str = typer.Option("skip", help="'skip' unreadable images (listed in the summary and the cache) or 'fail' on the first."),
    dtype: str = typer.Option("float16", help="Stored feature precision: float16 (half the disk) or float32."),
    rotation: float = typer.Option(45.0, help="Augmentation: max rotation in degrees."),
    zoom: float = typer.Option(0.25, help="Augmentation: max zoom in or out, as a fraction."),
    shift: float = typer.Option(0.2, help="Augmentation: max shift, as a fraction of width/height."),
    hflip: bool = typer.Option(True, "--hflip/--no-hflip", help="Augmentation: random horizontal flips."),
    force: bool = typer.Option(False, "--force", help="Replace a cache (or unfinished extraction) made with other settings."),
):
    """Run the frozen backbone once over every image (plus augmented passes) and cache pooled features.

    Killed or interrupted, the same command resumes where it stopped. A cache made with other
    settings is refused, naming the difference, unless --force.
    """
    from .augment import AugmentConfig
    from .extract import ExtractConfig, extract_features

    config = ExtractConfig(
        data=str(data), cache=str(cache), backbone=backbone, weights=weights, image_size=image_size,
        passes=passes, tta_passes=tta_passes, batch_size=batch_size, val_fraction=val_fraction,
        seed=seed, on_bad_image=on_bad_image, dtype=dtype,
        augmentation=AugmentConfig(rotation=rotation, zoom=zoom, shift=shift, hflip=hflip), force=force,
    )
    with ImageProgress("extracting") as bar:
        summary = extract_features(config, progress=bar.update)
    _print_extract_summary(summary)


class ImageProgress:
    """A rich progress bar with images/s and ETA, fed by (done, total) callbacks."""

    def __init__(self, description: str):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} img/s"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), transient=False, disable=not sys.stderr.isatty(),
        )
        self.description = description
        self.task = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, done: int, total: int):
        if self.task is None:
            self.task = self.progress.add_task(self.description, total=total, rate="  -", completed=done)
            self._start = done
            return
        self.progress.update(self.task, completed=done, total=total)
        speed = self.progress.tasks[0].speed
        self.progress.update(self.task, rate=f"{speed:5.1f}" if speed else "  -")


def _print_extract_summary(s):
    if s.status == "up to date":
        typer.echo(f"{s.path} is already up to date ({s.images} images, {s.passes} augmented passes); nothing to do")
        return
    typer.echo(
        f"wrote {s.path}: {s.images} labelled images x (1 clean + {s.passes} augmented passes), "
        f"{s.test_images} test images x {1 + s.tta_passes} passes, {len(s.skipped)} skipped, "
        f"{s.seconds:.1f} s, {s.file_bytes / 1e6:.1f} MB"
    )
    for line in s.skipped:
        path, _, reason = line.partition("\t")
        typer.echo(f"  skipped {path}: {reason}")


def main():
    app()


if __name__ == "__main__":
    main()
