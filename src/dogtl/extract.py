"""Stage one: run the frozen backbone once over every image (+ augmented passes)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .augment import AugmentConfig
from .backbones import check_image_size, get_backbone
from .cache import PartialCache, fingerprint_differences, open_cache, write_cache
from .data import Dataset, load_dataset, split_validation
from .errors import CacheError, DataError

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]  # (images done, images in total)


@dataclass(frozen=True)
class ExtractConfig:
    data: str = "data"
    cache: str = "cache/features.h5"
    backbone: str = "xception"
    weights: str = "imagenet"
    image_size: int | None = None
    passes: int = 5
    tta_passes: int = 0
    batch_size: int = 32
    val_fraction: float = 0.1
    seed: int = 2018
    on_bad_image: str = "skip"
    dtype: str = "float16"
    augmentation: AugmentConfig = field(default_factory=AugmentConfig)
    force: bool = False

    def __post_init__(self):
        if self.passes < 0 or self.tta_passes < 0:
            raise ValueError(f"--passes {self.passes} / --tta-passes {self.tta_passes} must be >= 0")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size {self.batch_size} must be at least 1")
        if self.on_bad_image not in ("skip", "fail"):
            raise ValueError(f"--on-bad-image {self.on_bad_image!r} must be 'skip' or 'fail'")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"--dtype {self.dtype!r} must be 'float16' or 'float32'")


@dataclass
class ExtractSummary:
    path: Path
    status: str  # "written" or "up to date"
    images: int
    test_images: int
    passes: int
    tta_passes: int
    skipped: list[str]
    seconds: float
    file_bytes: int


def versions() -> dict:
    import h5py
    import keras
    import tensorflow as tf

    from . import __version__

    return {"dogtl": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "h5py": h5py.__version__, "numpy": np.__version__}


def make_fingerprint(config: ExtractConfig, dataset: Dataset) -> dict:
    from .models import weights_identity

    spec = get_backbone(config.backbone)
    return {
        "backbone": spec.name,
        "weights": weights_identity(config.weights),
        "image_size": check_image_size(spec, config.image_size),
        "preprocessing": spec.preprocessing,
        "feature_dim": spec.feature_dim,
        "augmentation": config.augmentation.as_dict(),
        "passes": config.passes,
        "tta_passes": config.tta_passes,
        "seed": config.seed,
        "val_fraction": config.val_fraction,
        "dtype": config.dtype,
        "data_layout": dataset.layout,
        "file_list": dataset.file_list_hash(),
        "num_images": len(dataset.ids),
        "num_test_images": len(dataset.test_ids),
    }


def _check_existing(path: Path, partial: PartialCache, fingerprint: dict, force: bool):
    """Returns the up-to-date cache if there is one; refuses foreign ones unless forced."""
    if path.exists():
        try:
            existing = open_cache(path)
        except CacheError:
            existing = None
        if existing is not None and not fingerprint_differences(existing.fingerprint, fingerprint):
            return existing
        if not force:
            why = ("it is damaged" if existing is None else
                   "it was made with other settings: " + "; ".join(
                       fingerprint_differences(existing.fingerprint, fingerprint)))
            raise CacheError(f"{path} exists and {why}. Pass --force to replace it or --cache OTHER.h5")
        path.unlink()
    if partial.exists():
        diff = fingerprint_differences(partial.fingerprint(), fingerprint)
        if diff and not force:
            raise CacheError(
                f"{partial.dir} holds an unfinished extraction with other settings ({'; '.join(diff)}). "
                "Rerun it with those settings to finish it, or pass --force to discard it"
            )
        if diff or force:
            partial.remove()
    return None


def extract_features(config: ExtractConfig, progress: Progress | None = None) -> ExtractSummary:
    started = time.perf_counter()
    spec = get_backbone(config.backbone)
    image_size = check_image_size(spec, config.image_size)
    dataset = load_dataset(config.data)
    fingerprint = make_fingerprint(config, dataset)
    path = Path(config.cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = PartialCache(path)
    existing = _check_existing(path, partial, fingerprint, config.force)
    if existing is not None:
        return ExtractSummary(path, "up to date", len(existing.ids), len(existing.test_ids),
                              existing.num_passes - 1, existing.num_test_passes - 1, existing.skipped,
                              time.perf_counter() - started, path.stat().st_size)
    partial.start(fingerprint)

    import tensorflow as tf

    from .models import build_backbone

    backbone = build_backbone(spec, config.weights, image_size)
    infer = tf.function(lambda x: backbone(x, training=False), reduce_retracing=True)
    runner = _PassRunner(config, spec, image_size, partial, infer, progress)
    runner.total = ((1 + config.passes) * len(dataset.ids)
                    + (1 + config.tta_passes) * len(dataset.test_ids))

    good = {}
    for split, paths, extra in (("labelled", dataset.paths, config.passes),
                                ("test", dataset.test_paths, config.tta_passes)):
        good[split] = runner.clean_pass(split, paths)
        for p in range(1, extra + 1):
            runner.augmented_pass(split, paths, good[split], p)

    skipped = [f"{dataset.paths[i]}\t{_reason(dataset.paths[i])}"
               for i in sorted(set(range(len(dataset.ids))) - set(good["labelled"]))]
    skipped += [f"{dataset.test_paths[i]}\t{_reason(dataset.test_paths[i])}"
                for i in sorted(set(range(len(dataset.test_ids))) - set(good["test"]))]
    rows = np.asarray(good["labelled"], dtype=np.int64)
    labels = dataset.labels[rows]
    if len(np.unique(labels)) < 2:
        raise DataError(f"fewer than two classes have readable images in {config.data}")
    test_rows = np.asarray(good["test"], dtype=np.int64)
    write_cache(
        path, fingerprint=fingerprint, versions=versions(), classes=list(dataset.classes),
        labelled={"ids": [dataset.ids[i] for i in rows], "labels": labels.astype(np.int32),
                  "is_val": split_validation(labels, config.val_fraction, config.seed),
                  "features": [runner.pass_loader("labelled", p, rows) for p in range(1 + config.passes)]},
        test={"ids": [dataset.test_ids[i] for i in test_rows],
              "features": [runner.pass_loader("test", p, test_rows) for p in range(1 + config.tta_passes)]},
        skipped=skipped,
    )
    partial.remove()
    return ExtractSummary(path, "written", len(rows), len(test_rows), config.passes, config.tta_passes,
                          skipped, time.perf_counter() - started, path.stat().st_size)


def _reason(path) -> str:
    from .images import decode_error

    return decode_error(path) or "unreadable"


class _PassRunner:
    """Runs the backbone over one pass at a time, saving each finished batch."""

    def __init__(self, config, spec, image_size, partial, infer, progress):
        self.config, self.spec, self.image_size = config, spec, image_size
        self.partial, self.infer, self.progress = partial, infer, progress
        self.total, self.done = 0, 0

    def _run(self, split, pass_index, paths, positions, indices, fail_on_gap):
        from .images import image_dataset

        start = self.partial.covered(split, pass_index)
        self.done += start if pass_index == 0 else min(start, len(positions))
        self._report()
        todo = [k for k, pos in enumerate(positions) if pos >= start]
        if not todo:
            return
        ds = image_dataset([paths[k] for k in todo], self.spec, self.image_size,
                           positions=[positions[k] for k in todo], indices=[indices[k] for k in todo],
                           pass_index=pass_index, seed=self.config.seed,
                           augmentation=self.config.augmentation, batch_size=self.config.batch_size)
        expected = start
        for pos, _, images in ds:
            pos = pos.numpy()
            if fail_on_gap and (pos[0] != expected or pos[-1] - pos[0] != len(pos) - 1):
                self._fail(paths, expected, pos)
            features = self.infer(images).numpy().astype(self.config.dtype)
            self.partial.write(split, pass_index, pos, features)
            self.done += int(pos[-1]) + 1 - expected
            expected = int(pos[-1]) + 1
            self._report()
        if fail_on_gap and expected != len(positions):
            self._fail(paths, expected, np.array([len(positions)]))

    def _fail(self, paths, expected, pos):
        missing = next(p for p in range(expected, int(pos[-1]) + 1) if p not in set(pos.tolist()))
        raise DataError(f"{paths[missing]}: cannot read image ({_reason(paths[missing])}); "
                        "fix or remove it, or pass --on-bad-image skip")

    def _report(self):
        if self.progress:
            self.progress(min(self.done, self.total), self.total)

    def clean_pass(self, split, paths) -> list[int]:
        """Pass 0 over every file; returns the indices of the readable ones."""
        marker = f"{split}-readable.json"
        good = self.partial.load_json(marker)
        if good is None:
            n = len(paths)
            self._run(split, 0, paths, range(n), range(n), self.config.on_bad_image == "fail")
            good = self.partial.read(split, 0)[0].tolist()
            self.partial.save_json(marker, good)
        else:
            self.done += len(paths)
        return good

    def augmented_pass(self, split, paths, good, pass_index):
        self._run(split, pass_index, [paths[i] for i in good], range(len(good)), good, False)
        self.done += max(0, len(paths) - len(good))

    def pass_loader(self, split, pass_index, rows):
        """Loads one pass in file order of `rows` (pass 0 parts are keyed by file index)."""
        def load():
            positions, features = self.partial.read(split, pass_index)
            expected = rows if pass_index == 0 else np.arange(len(rows))
            if features is None:
                features = np.zeros((0, self.spec.feature_dim), self.config.dtype)
            if not np.array_equal(positions, expected):
                raise CacheError(f"pass {pass_index} of {split} images is inconsistent; rerun with --force")
            return features
        return load
