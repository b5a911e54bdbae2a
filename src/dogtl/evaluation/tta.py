"""Test-time augmentation: a model's probabilities averaged over the clean and augmented views.

The cache already holds augmented passes of every image (labelled: `--passes`, test:
`--tta-passes`), so TTA from the cache costs one head call per pass and no backbone work.
On images, pass p > 0 is the cache's augmentation p of the image (same seed and settings),
so cached and image TTA average the same views.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dogtl.data.augment import AugmentConfig, image_keys
from dogtl.evaluation.inference import predict_images
from dogtl.features.fingerprint import IMAGE_KEY


def cached_probabilities(model, cache, split: str = "labelled", rows=None, passes=None) -> np.ndarray:
    """Mean probabilities [passes averaged, rows, C] of `model` over cached passes of `split`
    (all passes by default; `rows` selects rows, e.g. the validation split)."""
    passes = range(cache.num_passes if split == "labelled" else cache.num_test_passes) if passes is None else passes
    total = None
    for p in passes:
        features = cache.features(split, passes=[p])[0]
        if rows is not None:
            features = features[rows]
        probs = model.predict(features, batch_size=1024, verbose=0).astype(np.float64)
        total = probs if total is None else total + probs
    return total / len(passes)


def image_probabilities(model, paths, spec, size, *, passes: int, seed: int, augmentation, indices=None,
                        batch_size: int = 32, progress=None, precision: str | None = None,
                        runtime: str | None = None):
    """(mean probabilities over pass 0 and augmented passes 1..passes-1 of image files, read mask)."""
    runs = []
    for p in range(passes):
        def step(done, n, p=p):
            if progress:
                progress(p * n + done, passes * n)
        runs.append(predict_images(model, paths, spec, size, indices=indices, pass_index=p, seed=seed,
                                   augmentation=augmentation, batch_size=batch_size, progress=step,
                                   precision=precision, runtime=runtime))
    return np.mean([r[0] for r in runs], axis=0), np.logical_and.reduce([r[1] for r in runs])


def augmentation_of(meta):
    """The augmentation settings and seed recorded with the model's cache (defaults if none)."""
    fingerprint = meta.backbones[0].cache_fingerprint or {}
    aug = fingerprint.get("augmentation")
    return (AugmentConfig(**aug) if aug else AugmentConfig()), int(fingerprint.get("seed", 0))


def augmentation_keys(meta, paths):
    """The keys the model's cache drew augmented passes of these files with: their ids' (file
    stems, as test ids are) for a format-2 cache, so TTA on test/ID.jpg averages the cached TTA
    passes of ID; else None (their positions, as format 1 numbered test files)."""
    fingerprint = meta.backbones[0].cache_fingerprint or {}
    return image_keys([Path(p).stem for p in paths]) if fingerprint.get("image_key") == IMAGE_KEY else None
