"""Synthetic feature caches: a valid cache file without any images or backbone.

For tests and benchmarks of stage two (a Kaggle-sized 9,174 x 2,048 x 6-pass cache takes
seconds to write this way). Each class has a random mean; an image's features are its
class mean plus its own noise, and each augmented pass adds more noise, so a head has
something real to learn and augmented passes differ from the clean one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dogtl.features.cachewriter import write_cache


def write_feature_cache(path: str | Path, *, num_images: int = 120, num_classes: int = 3, dim: int = 32,
                        passes: int = 2, test_images: int = 0, val_fraction: float = 0.25,
                        separation: float = 1.0, noise: float = 1.0, augment_noise: float = 0.5,
                        dtype: str = "float32", seed: int = 0, pass_transform=None) -> Path:
    """Write a complete cache with `passes` augmented passes on top of the clean one.

    `pass_transform(pass_index, features, labels, is_val) -> features` may rewrite a pass
    (tests use it to make clean and augmented passes tell different stories)."""

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = (np.arange(num_images) % num_classes).astype(np.int32)
    rng.shuffle(labels)
    means = rng.standard_normal((num_classes, dim)).astype(np.float32) * separation
    base = means[labels] + noise * rng.standard_normal((num_images, dim), dtype=np.float32)
    ids = [f"img{i:06d}" for i in range(num_images)]
    # Exactly val_fraction of each class (its first rows, labels being shuffled), so tests count on
    # the sizes; an extraction draws each image's side (data.folders.split_validation).
    is_val = np.zeros(num_images, bool)
    for k in range(num_classes):
        rows = np.flatnonzero(labels == k)
        is_val[rows[:min(int(round(val_fraction * len(rows))), len(rows) - 1)]] = True

    def pass_loader(p: int, rows: np.ndarray, n: int):
        def load():
            r = np.random.default_rng([seed, p])
            x = rows if p == 0 else rows + augment_noise * r.standard_normal((n, dim), dtype=np.float32)
            if pass_transform is not None and n == num_images:
                x = pass_transform(p, x, labels, is_val)
            return x.astype(dtype)
        return load

    test_base = (means[rng.integers(num_classes, size=test_images)]
                 + noise * rng.standard_normal((test_images, dim), dtype=np.float32))
    fingerprint = {"backbone": "synthetic", "weights": "none", "image_size": 0, "preprocessing": "none",
                   "feature_dim": dim, "passes": passes, "tta_passes": 0, "seed": seed,
                   "val_fraction": val_fraction, "dtype": dtype, "num_images": num_images,
                   "num_test_images": test_images, "file_list": f"synthetic-{seed}"}
    write_cache(path, fingerprint=fingerprint, versions={"dogtl": "synthetic"},
                classes=[f"class_{k:03d}" for k in range(num_classes)],
                labelled={"ids": ids, "labels": labels, "is_val": is_val,
                          "index": np.arange(num_images, dtype=np.int64),
                          "features": [pass_loader(p, base, num_images) for p in range(1 + passes)]},
                test={"ids": [f"test{i:06d}" for i in range(test_images)],
                      "index": np.arange(test_images, dtype=np.int64),
                      "features": [pass_loader(0, test_base, test_images)]},
                skipped=[])
    return path
