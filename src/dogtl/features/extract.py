"""Stage one: run the frozen backbone once over every image (+ augmented passes).

Work is saved one batch at a time (cache.PartialCache), so a rerun of a killed
extraction resumes at the first unsaved batch of each pass; pass p of image i depends
only on (seed, p, i), so resumed features equal those of an uninterrupted run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from dogtl.data.augment import AugmentConfig
from dogtl.features.backbones import check_image_size, get_backbone
from dogtl.features.cache import (PartialCache, damage, fingerprint_differences, is_cache_file, open_cache,
                                  space_needed, write_cache)
from dogtl.data.folders import Dataset, load_dataset, split_validation
from dogtl.core.errors import CacheError, DataError, DogtlError, SettingError
from dogtl.core.files import check_overwrite
from dogtl.core.diskspace import require_free_space
from dogtl.core.locks import hold, writes

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
    shard: str | None = None  # "I/N": extract the I-th of N shards (see shards.py)
    strategy: str = "default"  # default | mirrored | multi-worker (see distribute.py)
    precision: str = "auto"  # the backbone's arithmetic (core/precision.py); recorded resolved
    cut_blocks: int | str = 0  # also store the activations entering the top N blocks or 'all' (features/cut.py)
    cut_dtype: str = "float16"  # or int8 (per-image, per-channel scales)

    def __post_init__(self):
        from dogtl.core.distribute import check_strategy
        from dogtl.features.shards import parse_shard

        parse_shard(self.shard)
        check_strategy(self.strategy)
        if self.passes < 0 or self.tta_passes < 0:
            raise SettingError(f"--passes {self.passes} / --tta-passes {self.tta_passes} must be >= 0")
        if self.batch_size < 1:
            raise SettingError(f"--batch-size {self.batch_size} must be at least 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise SettingError(f"--val-fraction {self.val_fraction} must be in [0, 1)")
        if self.on_bad_image not in ("skip", "fail"):
            raise SettingError(f"--on-bad-image {self.on_bad_image!r} must be 'skip' or 'fail'")
        if self.dtype not in ("float16", "float32"):
            raise SettingError(f"--dtype {self.dtype!r} must be 'float16' or 'float32'")
        from dogtl.core.precision import check_precision
        from dogtl.core.settings import parse_blocks
        from dogtl.features.cut import CUT_DTYPES

        check_precision(self.precision)
        try:
            object.__setattr__(self, "cut_blocks", parse_blocks(self.cut_blocks))
        except SettingError as e:
            raise SettingError(f"--cut-blocks {self.cut_blocks!r}: expected {e}") from None
        if self.cut_dtype not in CUT_DTYPES:
            raise SettingError(f"--cut-dtype {self.cut_dtype!r} must be one of {', '.join(CUT_DTYPES)}")
        if self.cut_blocks and self.strategy != "default":
            raise SettingError(f"--cut-blocks runs on one device only: drop --strategy {self.strategy}")


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
    resumed: int = 0  # images found already done in an interrupted earlier run


def versions() -> dict:
    import h5py
    import keras
    import tensorflow as tf

    from dogtl import __version__

    return {"dogtl": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "h5py": h5py.__version__, "numpy": np.__version__}


def make_fingerprint(config: ExtractConfig, dataset: Dataset, backbone=None) -> dict:
    """`backbone` (the built model) is needed only with --cut-blocks, for the cut's shape."""
    from dogtl.core.models import weights_identity
    from dogtl.core.precision import resolve
    from dogtl.features.cut import cut_info

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
        "precision": resolve(config.precision),
        **({"cut": cut_info(backbone, spec, config.cut_blocks, config.cut_dtype)} if config.cut_blocks else {}),
        "data_layout": dataset.layout,
        "file_list": dataset.file_list_hash(),
        "num_images": len(dataset.ids),
        "num_test_images": len(dataset.test_ids),
        # A shard is this extraction's I-th of N parts: otherwise the same fingerprint.
        **({"shard": _shard(config).as_dict()} if config.shard else {}),
    }


def _shard(config: ExtractConfig):
    from dogtl.features.shards import parse_shard

    return parse_shard(config.shard)


def _check_existing(path: Path, partial: PartialCache, fingerprint: dict, force: bool):
    """Returns the up-to-date cache if there is one; refuses others unless forced.

    A file at `path` that is our format but unreadable is a damaged copy, worth nothing, and
    is replaced; a file that is not an HDF5 file at all is never overwritten without --force.
    """
    if path.exists():
        if path.is_dir():
            raise CacheError(f"--cache {path} is a folder: pass a file name such as {path / 'features.h5'}")
        try:
            existing, problem = open_cache(path), None
        except CacheError as e:
            existing, problem = None, str(e)
        if existing is not None and not fingerprint_differences(existing.fingerprint, fingerprint):
            problem = damage(path) if force else None  # --force redoes a cache whose checksums fail
            if problem is None:
                partial.remove()  # left over when a run was killed between its rename and cleanup
                return existing
            existing = None
        if existing is not None and not force:
            diff = "; ".join(fingerprint_differences(existing.fingerprint, fingerprint))
            raise CacheError(f"{path} was made with other settings ({diff}). "
                             "Pass --force to replace it, or --cache OTHER.h5")
        if existing is None and not is_cache_file(path):
            check_overwrite(path, force, "--cache", detail=" and is not a dogtl feature cache")
        log.warning("replacing %s (%s)", path, problem or "--force")
        path.unlink()
    if partial.exists():
        diff = fingerprint_differences(partial.fingerprint(), fingerprint)
        if diff and not force:
            raise CacheError(
                f"{partial.dir} holds an unfinished extraction with other settings ({'; '.join(diff)}). "
                "Rerun it with those settings to finish it, or pass --force to discard it"
            )
        if diff:
            partial.remove()
    return None


@writes
def extract_features(config: ExtractConfig, progress: Progress | None = None,
                     note: Callable[[str], None] | None = None) -> ExtractSummary:
    """`note` gets one line before the work starts (the disk the cut activations take)."""
    started = time.perf_counter()
    spec = get_backbone(config.backbone)
    image_size = check_image_size(spec, config.image_size)
    from dogtl.core.distribute import agree, extraction_progress, make_strategy, replicated_infer, scope, worker
    from dogtl.features.shards import shard_path

    strategy = make_strategy(config.strategy)  # first: multi-worker must start before any TensorFlow work
    dataset = load_dataset(config.data)
    # The split is drawn over every labelled image before any work, so an impossible split
    # fails now, and an image's split does not depend on which other images were unreadable.
    is_val = split_validation(dataset.labels, config.val_fraction, config.seed)
    backbone = None
    if config.cut_blocks:  # the cut's shape is part of the fingerprint
        from dogtl.core.models import build_backbone

        backbone = build_backbone(spec, config.weights, image_size)
    fingerprint = make_fingerprint(config, dataset, backbone)
    shard = _shard(config)
    # This run's block of each split's file numbers (all of them unless sharded).
    lab, tst = range(len(dataset.ids)), range(len(dataset.test_ids))
    if shard is not None:
        lab, tst = shard.rows(len(lab)), shard.rows(len(tst))
    path = worker(strategy).private_path(shard_path(config.cache, shard) if shard else config.cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    hold(path, "the feature shard" if shard else "the feature cache")  # one writer per cache or shard file
    partial = PartialCache(path)
    existing = _check_existing(path, partial, fingerprint, config.force)
    agree(strategy, extraction_progress(existing, partial, {"labelled": config.passes, "test": config.tta_passes}),
          "what is already extracted")
    if existing is not None:
        return ExtractSummary(path, "up to date", len(existing.ids), len(existing.test_ids),
                              existing.num_passes - 1, existing.num_test_passes - 1, existing.skipped,
                              time.perf_counter() - started, path.stat().st_size)

    import tensorflow as tf

    from dogtl.core.modelinfo import weights_path_to_record
    from dogtl.core.models import build_backbone

    from dogtl.core.precision import computing_in
    from dogtl.features.cut import cut_bytes, extraction_model

    if backbone is None:
        with scope(strategy):  # the model's variables on every replica
            backbone = build_backbone(spec, config.weights, image_size)  # a bad weights file fails before any write
    if config.cut_blocks and note:
        size = cut_bytes(fingerprint["cut"], (1 + config.passes) * len(lab) + (1 + config.tta_passes) * len(tst))
        note(f"cut activations (top {config.cut_blocks} blocks, {fingerprint['cut']['shape']} in "
             f"{config.cut_dtype}): {size / 1e6:,.1f} MB in the cache, as much again while extracting")
    require_free_space(path.parent, space_needed(path, fingerprint, len(lab), len(tst)),
                       f"extract-features --cut-blocks {config.cut_blocks} (features and cut activations)"
                       if config.cut_blocks else "extract-features")
    partial.start(fingerprint)
    model = extraction_model(backbone, spec, config.cut_blocks) if config.cut_blocks else backbone
    infer = (tf.function(lambda x: model(x, training=False), reduce_retracing=True) if strategy is None
             else replicated_infer(strategy, backbone))
    runner = _PassRunner(config, spec, image_size, partial, infer, progress)
    runner.cut_dtype = config.cut_dtype if config.cut_blocks else None
    # Positions are numbers within this run's block; augmentation keys are file numbers (block start + position).
    with computing_in(backbone, fingerprint["precision"]):
        good = runner.run({"labelled": (dataset.paths[lab.start:lab.stop], config.passes, lab.start),
                           "test": (dataset.test_paths[tst.start:tst.stop], config.tta_passes, tst.start)},
                          on_clean_pass=None if shard else  # a shard may hold one class; merge-cache checks
                          lambda split, readable: _check_readable(split, readable, dataset, config))

    skipped = [f"{dataset.paths[i]}\t{_reason(dataset.paths[i])}"
               for i in sorted(set(lab) - {lab.start + k for k in good["labelled"]})]
    skipped += [f"{dataset.test_paths[i]}\t{_reason(dataset.test_paths[i])}"
                for i in sorted(set(tst) - {tst.start + k for k in good["test"]})]
    rows = np.asarray(good["labelled"], dtype=np.int64)  # positions in the block
    test_rows = np.asarray(good["test"], dtype=np.int64)
    at, test_at = lab.start + rows, tst.start + test_rows  # file numbers
    from dogtl.features.cut import stored_layout

    cut = {"labelled": {}, "test": {}}
    for key in stored_layout(fingerprint):
        cut["labelled"][key] = [runner.pass_chunks("labelled", p, rows, key) for p in range(1 + config.passes)]
        cut["test"][key] = [runner.pass_chunks("test", p, test_rows, key) for p in range(1 + config.tta_passes)]
    write_cache(
        path, fingerprint=fingerprint, versions=versions(), classes=list(dataset.classes),
        labelled={"ids": [dataset.ids[i] for i in at], "labels": dataset.labels[at].astype(np.int32),
                  "is_val": is_val[at], "index": at,
                  "features": [runner.pass_chunks("labelled", p, rows) for p in range(1 + config.passes)],
                  **cut["labelled"]},
        test={"ids": [dataset.test_ids[i] for i in test_at], "index": test_at,
              "features": [runner.pass_chunks("test", p, test_rows) for p in range(1 + config.tta_passes)],
              **cut["test"]},
        skipped=skipped, weights_path=weights_path_to_record(config.weights),
    )
    partial.remove()
    return ExtractSummary(path, "written", len(rows), len(test_rows), config.passes, config.tta_passes,
                          skipped, time.perf_counter() - started, path.stat().st_size, runner.resumed)


def _check_readable(split, readable, dataset, config):
    if split == "labelled" and len(np.unique(dataset.labels[np.asarray(readable, dtype=np.int64)])) < 2:
        raise DataError(f"fewer than two classes have readable images in {config.data}: "
                        "fix the images (see --on-bad-image)")


def _reason(path) -> str:
    from dogtl.data.images import decode_error

    return decode_error(path) or "unreadable"


class _PassRunner:
    """Runs the backbone over every pass, saving each finished batch.

    All passes of both splits form one stream of batches (images.multi_pass_dataset), each
    pass starting at its first unsaved batch. Every pass covers every file, positions being
    file numbers; unreadable files are missing from every pass. Progress counts
    image-passes: `total` is (1 + passes) x images (+ the test images' passes); skipped
    images count as done, so the count ends exactly at `total`.
    """

    def __init__(self, config, spec, image_size, partial, infer, progress):
        self.config, self.spec, self.image_size = config, spec, image_size
        self.partial, self.infer, self.progress = partial, infer, progress
        self.total, self.done, self.resumed = 0, 0, 0
        self.warned = False
        self.cut_dtype = None  # with --cut-blocks: infer gives (features, cut activations), stored in this

    def _advance(self, n: int, resumed: bool = False):
        self.done += n
        if resumed:
            self.resumed += n
        if self.progress:
            self.progress(min(self.done, self.total), self.total)

    def run(self, splits: dict, on_clean_pass=None) -> dict:
        """Extracts what is missing; returns {split: numbers of the readable files}.

        `splits` maps a split to (paths, extra passes[, offset]): positions number `paths`
        from 0, the augmentation key of position i is offset + i (a shard's file numbers).
        """
        from dogtl.data.images import multi_pass_dataset

        self.good, self.on_clean_pass = {}, on_clean_pass
        segments = []
        for split, (paths, extra, *offset) in splits.items():
            paths = [str(p) for p in paths]
            n = len(paths)
            self.total += (1 + extra) * n
            readable = self.partial.load_json(f"{split}-readable.json")
            if readable is not None:
                self.good[split] = np.asarray(readable, dtype=np.int64)
            for p in range(1 + extra):
                start = n if (p == 0 and readable is not None) else min(self.partial.covered(split, p), n)
                segments.append(_Segment(split, p, paths, start, offset=offset[0] if offset else 0))
        self._advance(sum(s.start for s in segments), resumed=True)

        ds = multi_pass_dataset([(s.pass_index, range(s.start, len(s.paths)),
                                  range(s.offset + s.start, s.offset + len(s.paths)), s.paths[s.start:])
                                 for s in segments],
                                self.spec, self.image_size, seed=self.config.seed,
                                augmentation=self.config.augmentation, batch_size=self.config.batch_size)
        current = 0
        for tag, pos, _, images in ds if ds is not None else []:
            k = int(tag[0])
            for s in segments[current:k]:
                self._finish(s)
            current = k
            self._batch(segments[k], pos.numpy(), images)
        for s in segments[current:]:
            self._finish(s)
        return {split: self.good[split].tolist() for split in splits}

    def _batch(self, s, pos, images):
        if s.pass_index == 0:
            if self.config.on_bad_image == "fail" and (pos[0] != s.expected or pos[-1] - pos[0] != len(pos) - 1):
                self._fail(s, pos)
        else:  # exactly the files readable in the clean pass
            good = self.good[s.split]
            if not np.array_equal(pos, good[(good >= s.expected) & (good <= pos[-1])]):
                self._fail(s, pos)
        out, extra = self.infer(images), {}
        if self.cut_dtype:
            from dogtl.features.cut import encode

            out, extra = out[0], encode(np.asarray(out[1]).astype(np.float32), self.cut_dtype)
        features = self._store(np.asarray(out).astype(np.float32))  # computed perhaps in bfloat16/float16
        self.partial.write(s.split, s.pass_index, pos, features, **extra)
        self._advance(int(pos[-1]) + 1 - s.expected)
        s.expected = int(pos[-1]) + 1

    def _finish(self, s):
        """After the last batch of a pass: unreadable files at its end, the clean pass's record."""
        if s.finished:
            return
        s.finished = True
        n = len(s.paths)
        if s.pass_index == 0:
            if self.config.on_bad_image == "fail" and s.expected != n:
                self._fail(s, np.array([n]))
            if s.split not in self.good:  # not yet recorded: this run finished the clean pass
                self.good[s.split] = self.partial.positions(s.split, 0)
                self.partial.save_json(f"{s.split}-readable.json", self.good[s.split].tolist())
            if self.on_clean_pass:
                self.on_clean_pass(s.split, self.good[s.split])
        elif np.any(self.good[s.split] >= s.expected):
            self._fail(s, np.array([n]))
        self._advance(n - s.expected)

    def _store(self, features: np.ndarray) -> np.ndarray:
        """Features in the stored dtype; float16 overflow is an error, underflow a warning."""
        with np.errstate(over="ignore"):  # reported below, as one error naming the fix
            stored = features.astype(self.config.dtype)
        if not np.isfinite(stored).all():
            raise DogtlError(f"backbone features reach {np.abs(features).max():.3g}, beyond --dtype "
                             f"{self.config.dtype}: rerun with --dtype float32 --force")
        if not self.warned and np.any(features) and not np.any(stored):
            self.warned = True
            log.warning("features are too small for %s (max %.3g) and are stored as zeros: "
                        "use --dtype float32 (random 'none' weights often do this)",
                        self.config.dtype, np.abs(features).max())
        return stored

    def _fail(self, s, pos):
        seen = set(pos.tolist())
        if s.pass_index == 0:
            missing = next(p for p in range(s.expected, int(pos[-1]) + 1) if p not in seen)
            raise DataError(f"{s.paths[missing]}: cannot read image ({_reason(s.paths[missing])}); "
                            "rerun with --on-bad-image skip to go on without it (work done is kept)")
        good = self.good[s.split]
        missing = [int(p) for p in good[good >= s.expected] if p not in seen]
        if missing:
            raise DataError(f"{s.paths[missing[0]]}: readable in the clean pass but not in pass {s.pass_index} "
                            f"({_reason(s.paths[missing[0]])}); did it change during the run? rerun with --force")
        extra = next(int(p) for p in pos if p not in set(good.tolist()))
        raise DataError(f"{s.paths[extra]}: unreadable in the clean pass but readable in pass {s.pass_index}; "
                        "did it change during the run? rerun with --force")

    def pass_chunks(self, split, pass_index, rows, key="features"):
        """A callable streaming one pass as (row numbers, features) blocks (or another saved array,
        `key`), one saved batch at a time."""
        def chunks():
            for positions, features in self.partial.iter_pass(split, pass_index, key):
                at = np.searchsorted(rows, positions)  # positions are file numbers; rows the readable ones
                if np.any(at >= len(rows)) or np.any(rows[np.minimum(at, len(rows) - 1)] != positions):
                    raise CacheError(f"pass {pass_index} of {split} images is inconsistent; rerun with --force")
                yield at, features
        return chunks


@dataclass
class _Segment:
    """One pass of one split, from its first unsaved position."""

    split: str
    pass_index: int
    paths: list
    start: int
    expected: int = -1  # next position not yet accounted for
    finished: bool = False
    offset: int = 0  # augmentation key of position 0 (a shard's first file number)

    def __post_init__(self):
        self.expected = self.start
