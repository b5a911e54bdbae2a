"""The feature cache: the only code that touches its files.

While extracting, finished batches are saved as small files in `<cache>.partial/`,
each written to a temporary name and renamed, so a kill at any moment loses at most
the batch in flight. When every pass is done they are assembled into one HDF5 file,
written as `<cache>.tmp` and renamed: a file at the cache path is always complete.

HDF5 schema (readable with plain h5py):
  attrs:  format="dogtl-features", format_version=1, complete=True,
          fingerprint=<JSON of every setting that produced it>, versions=<JSON>
  classes                 (C,)           class names, sorted; labels index into it
  labelled/ids            (N,)           image ids (Kaggle id or "<class>/<stem>")
  labelled/labels         (N,)  int32
  labelled/is_val         (N,)  bool     the validation split every later stage uses
  labelled/features       (1+K, N, D)    pass 0 clean, passes 1..K augmented
  test/ids                (M,)
  test/features           (1+T, M, D)    pass 0 clean, 1..T test-time augmentation
  skipped                 (S,)           "path<TAB>reason" for images that could not be read
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import CacheError

FORMAT = "dogtl-features"
FORMAT_VERSION = 1
SPLITS = ("labelled", "test")
RESUME_HINT = "incomplete, run extract-features again to resume"
# Settings that do not change the features: differences are reported, never refused.
INFORMATIONAL = {"versions", "batch_size"}


def fingerprint_differences(stored: dict, wanted: dict) -> list[str]:
    keys = sorted((set(stored) | set(wanted)) - INFORMATIONAL)
    return [f"{k}: cache has {stored.get(k)!r}, now {wanted.get(k)!r}"
            for k in keys if stored.get(k) != wanted.get(k)]


def partial_dir(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


class PartialCache:
    """Finished batches of an extraction in progress, as crash-safe .npz files."""

    PART = re.compile(r"^(labelled|test)-p(\d+)-(\d{9})-(\d{9})\.npz$")

    def __init__(self, path: Path):
        self.dir = partial_dir(path)

    def exists(self) -> bool:
        return (self.dir / "fingerprint.json").exists()

    def start(self, fingerprint: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.dir / "fingerprint.json", json.dumps(fingerprint, sort_keys=True, indent=1))

    def fingerprint(self) -> dict:
        try:
            return json.loads((self.dir / "fingerprint.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CacheError(f"{self.dir}: damaged progress files ({e}); rerun with --force to start over") from None

    def _parts(self, split: str, pass_index: int) -> list[tuple[int, int, Path]]:
        parts = []
        for p in self.dir.iterdir():
            m = self.PART.match(p.name)
            if m and m[1] == split and int(m[2]) == pass_index:
                parts.append((int(m[3]), int(m[4]), p))
        return sorted(parts)

    def covered(self, split: str, pass_index: int) -> int:
        """Positions before this one are done (read or found unreadable)."""
        return max((end for _, end, _ in self._parts(split, pass_index)), default=0)

    def write(self, split: str, pass_index: int, positions: np.ndarray, features: np.ndarray) -> None:
        start, end = int(positions[0]), int(positions[-1]) + 1
        name = f"{split}-p{pass_index}-{start:09d}-{end:09d}.npz"
        tmp = self.dir / (name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, positions=positions, features=features)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / name)

    def read(self, split: str, pass_index: int):
        """All (positions, features) of one pass, in order of position."""
        positions, features = [], []
        for _, _, p in self._parts(split, pass_index):
            try:
                with np.load(p) as z:
                    positions.append(z["positions"])
                    features.append(z["features"])
            except (OSError, ValueError, KeyError) as e:
                p.unlink(missing_ok=True)  # a damaged batch is simply redone on the next run
                raise CacheError(f"{p}: damaged batch removed ({e}); {RESUME_HINT}") from None
        if not positions:
            return np.zeros(0, np.int64), None
        return np.concatenate(positions), np.concatenate(features)

    def save_json(self, name: str, value) -> None:
        _atomic_write_text(self.dir / name, json.dumps(value))

    def load_json(self, name: str):
        p = self.dir / name
        return json.loads(p.read_text()) if p.exists() else None

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_cache(path: Path, *, fingerprint: dict, versions: dict, classes, labelled: dict,
                test: dict, skipped: list[str]) -> None:
    """Write the complete cache atomically. `labelled`/`test` map names to arrays;
    their "features" entry is a list of per-pass arrays, copied one at a time."""
    import h5py

    tmp = path.with_name(path.name + ".tmp")
    str_dtype = h5py.string_dtype()
    with h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["complete"] = False
        f.attrs["fingerprint"] = json.dumps(fingerprint, sort_keys=True)
        f.attrs["versions"] = json.dumps(versions, sort_keys=True)
        f.create_dataset("classes", data=np.array(classes, dtype=object), dtype=str_dtype)
        f.create_dataset("skipped", data=np.array(skipped, dtype=object), dtype=str_dtype)
        for split, arrays in (("labelled", labelled), ("test", test)):
            g = f.create_group(split)
            for key, value in arrays.items():
                if key == "features":
                    continue
                if key == "ids":
                    g.create_dataset(key, data=np.array(value, dtype=object), dtype=str_dtype)
                else:
                    g.create_dataset(key, data=np.asarray(value))
            passes = arrays["features"]
            dim = fingerprint["feature_dim"]
            n = len(arrays["ids"])
            ds = g.create_dataset("features", shape=(len(passes), n, dim), dtype=fingerprint["dtype"],
                                  chunks=(1, max(1, min(n, 1024)), dim) if n else None)
            for p, load in enumerate(passes):
                if n:
                    ds[p] = load()
        f.attrs["complete"] = True
    os.replace(tmp, path)


@dataclass
class FeatureCache:
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

    def features(self, split: str = "labelled", passes=None) -> np.ndarray:
        """float32 features [passes, rows, dim] of `split` ("labelled" or "test")."""
        import h5py

        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        with h5py.File(self.path, "r") as f:
            ds = f[split]["features"]
            data = ds[:] if passes is None else ds[sorted(passes)]
        return data.astype(np.float32)


def open_cache(path: str | Path) -> FeatureCache:
    """Open a complete cache, or raise CacheError saying what is wrong and what to do."""
    import h5py

    path = Path(path)
    if not path.exists():
        if PartialCache(path).exists():
            raise CacheError(f"{path}: {RESUME_HINT}")
        raise CacheError(f"{path}: no feature cache there; run `dogtl extract-features` first (or pass --cache FILE)")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise CacheError(f"{path}: not a dogtl feature cache; pass the file written by extract-features")
            if not f.attrs.get("complete", False):
                raise CacheError(f"{path}: {RESUME_HINT}")
            return FeatureCache(
                path=path,
                fingerprint=json.loads(f.attrs["fingerprint"]),
                versions=json.loads(f.attrs["versions"]),
                classes=[c.decode() if isinstance(c, bytes) else c for c in f["classes"][:]],
                ids=f["labelled/ids"].asstr()[:],
                labels=f["labelled/labels"][:],
                is_val=f["labelled/is_val"][:].astype(bool),
                test_ids=f["test/ids"].asstr()[:],
                skipped=list(f["skipped"].asstr()[:]),
                shapes={s: f[s]["features"].shape for s in SPLITS},
            )
    except CacheError:
        raise
    except (OSError, KeyError, ValueError) as e:
        raise CacheError(f"{path}: damaged or {RESUME_HINT} ({str(e)[:120]})") from None
