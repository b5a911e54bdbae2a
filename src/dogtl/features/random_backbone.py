"""A randomly initialised backbone that is useful for smoke tests, as `dogtl demo` offline.

`--weights none` builds the backbone from a fixed seed (the same in every process). Its
BatchNorm layers keep their initial statistics (mean 0, variance 1), so activations shrink
layer after layer and the features come out near-constant (~1e-12 for mobilenet_v2): a head
on them stays at chance. With the statistics of the data's own images every layer is
normalised and the random features differ between images. The calibrated backbone is saved
as a local weights file, so every later stage rebuilds exactly the same one.
"""

from __future__ import annotations

from pathlib import Path

from dogtl.core.diskspace import require_free_space
from dogtl.core.errors import DataError
from dogtl.core.files import atomic_path, make_folder
from dogtl.core.models import build_backbone, calibrate_batchnorm
from dogtl.data.images import image_dataset

CALIBRATION_IMAGES = 32


def random_backbone_path(cache: str | Path) -> Path:
    """Where extract-features keeps the calibrated random backbone of `cache`: beside it."""
    cache = Path(cache)
    return cache.with_name(f"{cache.name.split('.')[0]}.random-backbone.weights.h5")


def calibrate_random_backbone(spec, image_size: int, paths, out: str | Path, images: int = CALIBRATION_IMAGES,
                              what: str = "the random backbone") -> Path:
    """The seeded random backbone with the BatchNorm statistics of up to `images` of `paths`
    (spread over the list; unreadable files are left out), saved atomically at `out` (refused
    first, naming `what`, without the room). The same images give the same file, byte for byte."""
    paths = list(paths)
    chosen = paths[:: max(1, len(paths) // images)][:images]
    batches = list(image_dataset(chosen, spec, image_size, batch_size=len(chosen) or 1))
    if not batches:
        raise DataError(f"none of the {len(chosen)} images chosen to calibrate the random backbone can be read "
                        f"(e.g. {chosen[0] if chosen else 'none'}): fix the images")
    backbone = build_backbone(spec, "none", image_size, input_name="image")
    out = Path(out)
    make_folder(out.parent)
    require_free_space(out.parent, 4 * backbone.count_params() + (1 << 20), f"{what} (the calibrated random backbone)")
    calibrate_batchnorm(backbone, batches[0][2])
    with atomic_path(out) as tmp:
        backbone.save_weights(tmp)
    return out
