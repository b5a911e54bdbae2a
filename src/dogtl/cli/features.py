"""Stage one on the command line: extract-features and merge-cache."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dogtl import api
from dogtl.cli.common import ImageProgress, friendly_errors
from dogtl.core.settings import with_options
from dogtl.features.settings import EXTRACT_SETTINGS


@friendly_errors
@with_options(EXTRACT_SETTINGS)
def extract_features_cmd(settings: dict = None):
    """Run the frozen backbone once over every image (plus augmented passes) and cache pooled features.

    Killed or interrupted, the same command resumes where it stopped. A cache made with other
    settings is refused, naming the difference, unless --force. When only the images changed
    (added, removed, relabelled, edited, the test set arriving later), the cache is updated:
    unchanged images are copied and only new or changed ones computed, giving the same cache as
    a fresh extraction; heads trained on the old cache are then refused, naming the change.
    """
    with ImageProgress("extracting") as bar:
        summary = api.extract_features(progress=bar, note=bar.echo, **settings)
    _print_extract_summary(summary)


def _print_extract_summary(s):
    if s.status == "up to date":
        typer.echo(f"{s.path} is already up to date ({s.images} images, {s.passes} augmented passes); nothing to do")
        return
    verb = "updated" if s.status == "updated" else "wrote"
    copied = (f" ({s.computed} images computed, {s.images + s.test_images + len(s.skipped) - s.computed} copied "
              "from the old cache)" if s.status == "updated" else "")
    typer.echo(
        f"{verb} {s.path}: {s.images} labelled images x (1 clean + {s.passes} augmented passes), "
        f"{s.test_images} test images x {1 + s.tta_passes} passes, {len(s.skipped)} skipped{copied}, "
        f"{s.seconds:.1f} s on {s.runtime}, {s.file_bytes / 1e6:.1f} MB"
    )
    for line in s.skipped:
        path, _, reason = line.partition("\t")
        typer.echo(f"  skipped {path}: {reason}")


@friendly_errors
def merge_cache_cmd(
    shards: list[Path] = typer.Argument(..., metavar="SHARD...", help="Every shard file of one extraction (extract-features --shard I/N), e.g. cache/features.shard-*-of-4.h5."),
    out: Optional[Path] = typer.Option(None, help="Merged cache to write (default: the shards' name without .shard-I-of-N, e.g. cache/features.h5)."),
    copy: bool = typer.Option(False, "--copy", help="Copy the features into one self-contained file (default: an HDF5 virtual dataset reading the shards in place; keep them beside it)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
):
    """Join the shards of a sharded extraction into one cache, equal to a single machine's.

    Refuses missing, duplicate or foreign shards (another extraction's), naming them.
    """
    s = api.merge_cache(shards, out, copy=copy, force=force)
    typer.echo(f"wrote {s.path}: {s.shards} shards, {s.images} labelled and {s.test_images} test images, "
               f"{s.skipped} skipped, {s.file_bytes / 1e6:.1f} MB"
               + ("" if s.mode == "copy" else " (reads the shards in place: keep them beside it, or use --copy)"))
