"""Stage one on the command line: extract-features and merge-cache."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dogtl import api
from dogtl.cli.common import ImageProgress, friendly_errors
from dogtl.core.precision import PRECISION_HELP
from dogtl.core.runtimes import RUNTIME_HELP
from dogtl.features.backbones import backbone_help


@friendly_errors
def extract_features_cmd(
    data: Path = typer.Option(Path("data"), help="Data folder: Kaggle layout (labels.csv, train/, test/), ImageFolder layout (train/<class>/, val/<class>/ as the validation split, test/) or one sub-folder per class. Images: JPEG, PNG, GIF, BMP or WebP."),
    cache: Path = typer.Option(Path("cache/features.h5"), help="HDF5 file to write the features to."),
    id_column: Optional[str] = typer.Option(None, help="Kaggle layout: labels.csv's column of image ids (default: recognised by name, e.g. id, image, filename, or the first of two columns). Ids may name the file with or without its extension."),
    label_column: Optional[str] = typer.Option(None, help="Kaggle layout: labels.csv's column of class names (default: recognised by name, e.g. breed, label, class, or the second of two columns)."),
    backbone: str = typer.Option("xception", help=backbone_help()),
    weights: str = typer.Option("imagenet", help="'imagenet' (downloaded by Keras), 'none' (random, for smoke tests) or PATH to a local no-top weights file."),
    image_size: Optional[int] = typer.Option(None, help="Square input size in pixels (default: the backbone's own, 299 for xception)."),
    passes: int = typer.Option(5, help="Augmented passes over every labelled image, on top of the clean pass."),
    tta_passes: int = typer.Option(0, help="Augmented passes over test images, for test-time augmentation."),
    batch_size: int = typer.Option(32, help="Images per backbone call."),
    val_fraction: float = typer.Option(0.1, help="Validation fraction, stored in the cache for every later stage. Each image's side is its own seeded draw, so it stays put when other images are added or removed; each class gives this fraction on average (a small class may give none) and keeps at least one training image. The ImageFolder layout's val/ folder is used instead when there is one."),
    seed: int = typer.Option(2018, help="Seed of the split and of every augmentation."),
    on_bad_image: str = typer.Option("skip", help="'skip' unreadable images (listed in the summary and the cache) or 'fail' on the first."),
    dtype: str = typer.Option("float16", help="Stored feature precision: float16 (half the disk) or float32."),
    rotation: float = typer.Option(45.0, help="Augmentation: max rotation in degrees."),
    zoom: float = typer.Option(0.25, help="Augmentation: max zoom in or out, as a fraction."),
    shift: float = typer.Option(0.2, help="Augmentation: max shift, as a fraction of width/height."),
    hflip: bool = typer.Option(True, "--hflip/--no-hflip", help="Augmentation: random horizontal flips."),
    force: bool = typer.Option(False, "--force", help="Replace a cache (or unfinished extraction) made with other settings, recomputing every image. Not needed when only the images changed: see below."),
    shard: Optional[str] = typer.Option(None, help="I/N: extract only the I-th of N disjoint shards (one per machine) into CACHE-STEM.shard-I-of-N.h5; join them with `dogtl merge-cache`."),
    strategy: str = typer.Option("default", help="default (one device), mirrored (every local GPU) or multi-worker (hosts in TF_CONFIG). --batch-size is then the global batch, split over all replicas."),
    precision: str = typer.Option("auto", help=PRECISION_HELP + " Recorded in the cache: a cache made at another precision is refused."),
    runtime: str = typer.Option("auto", help=RUNTIME_HELP + " Recorded in the cache, not refused: runtimes give the same features to float rounding."),
    cut_blocks: str = typer.Option("0", help="Also store, for every pass, the activations entering the top N backbone blocks, so `finetune --from-cache --trainable-blocks M` trains the top M <= N blocks without the images (xception at 299 px, 2: 19x19x728 values, ~526 KB per image and pass in float16). 'all': the preprocessed, augmented images themselves (the whole backbone trains from the cache, skipping only decoding and augmentation). Says how much disk that takes and refuses to start without the room."),
    cut_dtype: str = typer.Option("float16", help="Stored precision of the cut activations: float16, or int8 with a scale per image and channel (half the disk)."),
):
    """Run the frozen backbone once over every image (plus augmented passes) and cache pooled features.

    Killed or interrupted, the same command resumes where it stopped. A cache made with other
    settings is refused, naming the difference, unless --force. When only the images changed
    (added, removed, relabelled, edited, the test set arriving later), the cache is updated:
    unchanged images are copied and only new or changed ones computed, giving the same cache as
    a fresh extraction; heads trained on the old cache are then refused, naming the change.
    """
    with ImageProgress("extracting") as bar:
        summary = api.extract_features(
            data, cache, force=force, progress=bar, backbone=backbone, weights=weights, image_size=image_size,
            passes=passes, tta_passes=tta_passes, batch_size=batch_size, val_fraction=val_fraction, seed=seed,
            on_bad_image=on_bad_image, dtype=dtype, rotation=rotation, zoom=zoom, shift=shift, hflip=hflip,
            shard=shard, strategy=strategy, precision=precision, runtime=runtime, cut_blocks=cut_blocks, cut_dtype=cut_dtype,
            id_column=id_column, label_column=label_column,
            note=bar.echo)
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
