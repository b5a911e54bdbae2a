"""Several feature caches of the same images read as one: their features concatenated per row.

`train-head --cache a.h5 --cache b.h5` (and sweep, lr-find) trains one head on the
features of several backbones (or of one backbone at several image sizes), the way the
strongest public Kaggle dog notebooks stacked Xception and InceptionV3 features under one
linear model. The caches must describe the same images in the same order: ids, labels,
validation split, classes, test ids, seed, number of passes and augmentation. Backbone,
weights, image size, preprocessing, feature size and storage dtype may differ. Anything
else is refused with the differing setting named.

A head trained this way records every cache in its metadata (`backbones`, one entry per
cache, in order); `head_inputs` gives those metadata entries and features/modelcache.py
opens the caches again for evaluate/predict.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dogtl.core.errors import CacheError
from dogtl.core.metadata import BackboneInput
from dogtl.features.cache import CacheShapes, FeatureCache, open_cache
from dogtl.features.fingerprint import fingerprint_differences

# Fingerprint settings that may differ between caches concatenated into one head.
PER_BACKBONE = {"backbone", "weights", "image_size", "preprocessing", "feature_dim", "dtype", "shard"}


class MultiCache(CacheShapes):
    """Read-only view of several caches of the same images as one cache (FeatureCache's interface)."""

    def __init__(self, caches: list[FeatureCache]):
        self.caches = list(caches)
        first = self.caches[0]
        self.paths = [c.path for c in self.caches]
        self.path = Path(" + ".join(str(p) for p in self.paths))  # for messages
        self.classes, self.ids, self.labels, self.is_val = first.classes, first.ids, first.labels, first.is_val
        self.test_ids, self.skipped, self.versions = first.test_ids, first.skipped, first.versions
        self.weights_path = first.weights_path
        dtypes = {c.fingerprint.get("dtype", "float32") for c in self.caches}
        # One fingerprint for sweep keys and storage: every cache's, in order.
        self.fingerprint = {"caches": [c.fingerprint for c in self.caches],
                            "dtype": "float16" if dtypes == {"float16"} else "float32"}
        self.shapes = {split: (first.shapes[split][0], first.shapes[split][1],
                               sum(c.shapes[split][2] for c in self.caches)) for split in first.shapes}

    def features(self, split: str = "labelled", passes=None) -> np.ndarray:
        """float32 features [passes, rows, sum of dims]: each cache's, side by side, in --cache order."""
        return np.concatenate([c.features(split, passes) for c in self.caches], axis=-1)


def _same_images(first: FeatureCache, other: FeatureCache) -> str | None:
    """Why `other` does not describe the same images as `first` (None when it does)."""
    a = {k: v for k, v in first.fingerprint.items() if k not in PER_BACKBONE}
    b = {k: v for k, v in other.fingerprint.items() if k not in PER_BACKBONE}
    diff = fingerprint_differences(a, b)
    if diff:
        return diff[0].replace("cache has", f"{first.path.name} has").replace(", now", f", {other.path.name}")
    checks = [("classes", list(first.classes) == list(other.classes)),
              ("image ids", np.array_equal(first.ids, other.ids)),
              ("labels", np.array_equal(first.labels, other.labels)),
              ("validation split", np.array_equal(first.is_val, other.is_val)),
              ("test image ids", np.array_equal(first.test_ids, other.test_ids)),
              ("number of passes", first.num_passes == other.num_passes),
              ("number of test passes", first.num_test_passes == other.num_test_passes)]
    for what, same in checks:
        if not same:
            return f"{what} differ"
    return None


def combine(caches: list[FeatureCache]) -> FeatureCache | MultiCache:
    """One cache as is; several as a MultiCache, refusing caches of other images."""
    if len(caches) == 1:
        return caches[0]
    seen = {}
    for c in caches:
        key = str(Path(c.path).resolve())
        if key in seen:
            raise CacheError(f"--cache {c.path} is given twice: pass each cache once")
        seen[key] = c
    for other in caches[1:]:
        why = _same_images(caches[0], other)
        if why:
            raise CacheError(f"--cache {other.path} does not describe the same images as {caches[0].path} "
                             f"({why}): concatenated caches must come from the same data folder, seed, "
                             "validation split and number of passes; re-extract one of them to match")
    return MultiCache(caches)


def as_paths(cache) -> list:
    """A cache argument (one path, or a list/tuple of paths) as a list of paths."""
    if isinstance(cache, (list, tuple)):
        if not cache:
            raise CacheError("no --cache given: pass at least one feature cache")
        return list(cache)
    return [cache]


def open_caches(cache) -> FeatureCache | MultiCache:
    """Open one cache path, or several (a list) concatenated per row."""
    return combine([open_cache(p) for p in as_paths(cache)])


def cache_value(cache) -> str | list[str]:
    """How a (multi)cache is written in a settings file: a path, or a list of paths."""
    return [str(p) for p in cache.paths] if isinstance(cache, MultiCache) else str(cache.path)


def _entry(cache: FeatureCache) -> BackboneInput:
    fp = cache.fingerprint
    return BackboneInput(backbone=fp.get("backbone"), weights=fp.get("weights"), image_size=fp.get("image_size"),
                         weights_path=cache.weights_path, preprocessing=fp.get("preprocessing"),
                         feature_dim=cache.feature_dim, cache=str(cache.path), cache_fingerprint=fp)


def head_inputs(cache) -> list[BackboneInput]:
    """The metadata's backbones binding a head to its cache(s): one entry per cache, in order,
    each with its backbone, weights, image size, preprocessing, feature size and fingerprint."""
    return [_entry(c) for c in getattr(cache, "caches", [cache])]


