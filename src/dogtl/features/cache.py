"""A complete feature cache, opened for reading: what it holds, its features read on demand.

The file's schema and its damage checks are in cacheformat.py; open_cache refuses an
incomplete, foreign, damaged or inconsistent file with what to do about it. Caches written
before checksums still open.

Format 1 (dogtl before incremental caches) keyed augmentation by `index` and drew the split
over the whole file list: such caches still open and every stage reads them (the key being
`index`), but extract-features cannot update them incrementally (features/incremental.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dogtl.core.errors import CacheError, DamagedError, SettingError
from dogtl.features.cacheformat import (DAMAGED_HINT, FORMAT, FORMAT_VERSION, RESUME_HINT, SPLITS, STRING_COLUMNS,
                                        content_digest, is_cache_file, read_block)
from dogtl.features.partial import PartialCache

# local: h5py is imported where a file is read or written: argument checks import this module.


class CacheShapes:
    """What the shapes {split: (passes, rows, dim)} say, for one cache or several side by side."""

    @property
    def num_passes(self) -> int:
        """Labelled passes, clean included."""
        return self.shapes["labelled"][0]

    @property
    def num_test_passes(self) -> int:
        return self.shapes["test"][0]

    @property
    def feature_dim(self) -> int:
        return self.shapes["labelled"][2]


@dataclass
class FeatureCache(CacheShapes):
    """A complete cache, opened for reading. Features are read on demand."""

    path: Path
    fingerprint: dict
    versions: dict
    classes: list[str]
    ids: np.ndarray
    labels: np.ndarray
    is_val: np.ndarray
    test_ids: np.ndarray
    skipped: list[str]
    shapes: dict = field(default_factory=dict)
    weights_path: str | None = None  # where a local weights file was at extraction (not in the fingerprint)
    format_version: int = FORMAT_VERSION
    # The incremental updates that led to this cache, oldest first: {"from": {file_list, test_file_list}
    # before, "to": {...} after, "labelled": "+500 images, 3 relabelled, ...", "test": "..."}. Empty for a
    # fresh extraction (features/incremental.py).
    updates: list = field(default_factory=list)

    def column(self, split: str, name: str) -> np.ndarray | None:
        """A per-row dataset of `split` ("index", "key", "sha256", ...); None when this cache has none."""
        import h5py

        with h5py.File(self.path, "r") as f:
            if name not in f[split]:
                return None
            ds = f[split][name]
            return ds.asstr()[:] if name in STRING_COLUMNS else read_block(self.path, ds, slice(None))

    def augmentation_keys(self, split: str = "labelled") -> np.ndarray | None:
        """The key augmented pass p of each row was drawn with: `key` (format 2), or `index` (format
        1: the file number at extraction); None for a cache holding neither."""
        keys = self.column(split, "key")
        return self.column(split, "index") if keys is None else keys

    def read_rows(self, split: str, pass_index: int, rows, key: str = "features") -> np.ndarray:
        """Pass `pass_index` of the given rows (any order) of `features` or another per-pass dataset:
        one read of the span they cover when they are near each other, else one read per row."""
        import h5py

        rows = np.asarray(rows, dtype=np.int64)
        with h5py.File(self.path, "r") as f:
            ds = f[split][key]
            if not len(rows):
                return np.empty((0, *ds.shape[2:]), ds.dtype)
            lo, hi = int(rows.min()), int(rows.max()) + 1
            if hi - lo <= 2 * len(rows) + 64:
                return read_block(self.path, ds, pass_index, slice(lo, hi))[rows - lo]
            return np.stack([read_block(self.path, ds, pass_index, int(r)) for r in rows])

    def features(self, split: str = "labelled", passes=None) -> np.ndarray:
        """float32 features [passes, rows, dim] of `split` ("labelled" or "test")."""
        import h5py

        if split not in SPLITS:
            raise SettingError(f"split must be one of {SPLITS}, not {split!r}")
        total = self.shapes[split][0]
        wanted = list(range(total)) if passes is None else [int(p) for p in passes]
        bad = [p for p in wanted if not 0 <= p < total]
        if bad:
            raise SettingError(f"{self.path}: {split} features have passes 0..{total - 1}, not {bad}")
        try:
            with h5py.File(self.path, "r") as f:
                ds = f[split]["features"]
                out = np.empty((len(wanted), ds.shape[1], ds.shape[2]), np.float32)
                for k, p in enumerate(wanted):
                    out[k] = ds[p]
        except (OSError, KeyError) as e:
            raise DamagedError(f"{self.path}: {DAMAGED_HINT} (reading {split} features: {str(e)[:120]})") from None
        return out


def open_cache(path: str | Path) -> FeatureCache:
    """Open a complete cache, or raise CacheError saying what is wrong and what to do."""
    import h5py

    path = Path(path)
    if not path.exists():
        if PartialCache(path).exists():
            raise CacheError(f"{path}: {RESUME_HINT}")
        raise CacheError(f"{path}: no feature cache there; run `dogtl extract-features` first (or pass --cache FILE)")
    if path.is_dir():
        raise CacheError(f"{path} is a folder, not a feature cache: pass --cache FILE")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise CacheError(f"{path}: not a dogtl feature cache; pass the file written by extract-features")
            if not f.attrs.get("complete", False):
                raise CacheError(f"{path}: {RESUME_HINT}")
            cache = FeatureCache(
                path=path,
                fingerprint=json.loads(f.attrs["fingerprint"]),
                versions=json.loads(f.attrs["versions"]),
                classes=list(f["classes"].asstr()[:]),
                ids=f["labelled/ids"].asstr()[:],
                labels=f["labelled/labels"][:],
                is_val=f["labelled/is_val"][:].astype(bool),
                test_ids=f["test/ids"].asstr()[:],
                skipped=list(f["skipped"].asstr()[:]),
                shapes={s: f[s]["features"].shape for s in SPLITS},
                weights_path=f.attrs.get("weights_path"),
                format_version=int(f.attrs.get("format_version", 1)),
                updates=json.loads(f.attrs.get("updates", "[]")),
            )
            _check_sources(path, f)
            stored = f.attrs.get("content_sha256")
            if stored is not None and stored != content_digest(f):
                raise DamagedError(f"{path}: {DAMAGED_HINT} (its attributes or image ids changed since it was written)")
    except CacheError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        if not is_cache_file(path):
            raise CacheError(f"{path}: not a dogtl feature cache; pass the file written by extract-features") from None
        raise CacheError(f"{path}: damaged or {RESUME_HINT} ({str(e)[:120]})") from None
    _check_consistent(cache)
    return cache


def _check_sources(path: Path, f) -> None:
    """A cache merged from shards as virtual datasets (shards.py) reads them in place: a missing
    shard would read as fill values, so it is refused here. Relative names are beside `path`."""
    for split in SPLITS:
        ds = f[split]["features"]
        if ds.is_virtual:
            for source in {m.file_name for m in ds.virtual_sources()}:
                if source != "." and not (path.parent / source).exists():
                    raise CacheError(f"{path} reads its features from the shard {path.parent / source}, which is "
                                     "missing: put it back, or merge the shards again with --copy")


def _check_consistent(c: FeatureCache) -> None:
    fp = c.fingerprint
    want = {"labelled": (1 + fp.get("passes", c.num_passes - 1), len(c.ids), fp.get("feature_dim")),
            "test": (1 + fp.get("tta_passes", c.num_test_passes - 1), len(c.test_ids), fp.get("feature_dim"))}
    problems = [f"{s}/features is {tuple(c.shapes[s])}, expected {want[s]}"
                for s in SPLITS if tuple(c.shapes[s]) != want[s]]
    if len(c.labels) != len(c.ids) or len(c.is_val) != len(c.ids):
        problems.append("labels, is_val and ids differ in length")
    if len(c.labels) and (c.labels.min() < 0 or c.labels.max() >= len(c.classes)):
        problems.append("labels out of range of classes")
    if problems:
        raise CacheError(f"{c.path}: damaged or {RESUME_HINT} ({'; '.join(problems)})")
