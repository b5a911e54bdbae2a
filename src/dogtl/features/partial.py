"""An extraction in progress: its finished batches, kept in `<cache>.partial/`.

Each batch is written to a temporary name and renamed, so a kill at any moment loses at most
the batch in flight; the next run resumes after the batches there. When every pass is done,
cachewriter.py streams them, one part file at a time, into the cache file.
"""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np

from dogtl.core.errors import CacheError
from dogtl.core.files import atomic_path, write_text_atomic
from dogtl.core.temporaries import fixed_temporary, progress_folder
from dogtl.features.cacheformat import RESUME_HINT
from dogtl.features.cut import cut_bytes


def partial_dir(path: Path) -> Path:
    return progress_folder(path)


class PartialCache:
    """Finished batches of an extraction in progress, as crash-safe .npz files."""

    PART = re.compile(r"^(labelled|test)-p(\d+)-(\d{9})-(\d{9})\.npz$")

    def __init__(self, path: Path):
        self.dir = partial_dir(path)

    def exists(self) -> bool:
        return (self.dir / "fingerprint.json").exists()

    def start(self, fingerprint: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.dir / "fingerprint.json", json.dumps(fingerprint, sort_keys=True, indent=1),
                          durable=True)

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
        """Every position before this one is done (saved, or found unreadable)."""
        return max((end for _, end, _ in self._parts(split, pass_index)), default=0)

    def write(self, split: str, pass_index: int, positions: np.ndarray, features: np.ndarray, **extra) -> None:
        start, end = int(positions[0]), int(positions[-1]) + 1
        name = f"{split}-p{pass_index}-{start:09d}-{end:09d}.npz"
        # Not durable: once renamed, a batch survives any kill of this process (the kernel holds it),
        # and fsyncing every batch stalls the model on a busy disk. A batch damaged by an OS crash
        # fails its zip CRC check when read and is then removed and redone. The fixed temporary
        # name lets the batch a killed run was writing be overwritten when it is redone.
        with atomic_path(self.dir / name, tmp=fixed_temporary(self.dir / name)) as tmp, open(tmp, "wb") as f:
            np.savez(f, positions=positions, features=features, **extra)

    def _load(self, part: Path, *keys):
        try:
            with np.load(part) as z:
                return tuple(z[k] for k in keys)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            part.unlink(missing_ok=True)  # a damaged batch is simply redone on the next run
            raise CacheError(f"{part}: damaged batch removed ({e}); {RESUME_HINT}") from None

    def positions(self, split: str, pass_index: int) -> np.ndarray:
        """The saved positions of one pass, in order (features are not read)."""
        chunks = [self._load(p, "positions")[0] for _, _, p in self._parts(split, pass_index)]
        return np.concatenate(chunks) if chunks else np.zeros(0, np.int64)

    def iter_pass(self, split: str, pass_index: int, key: str = "features"):
        """(positions, features) (or another saved array) of one pass, one saved batch at a time, in order."""
        for _, _, p in self._parts(split, pass_index):
            yield self._load(p, "positions", key)

    def save_json(self, name: str, value) -> None:
        write_text_atomic(self.dir / name, json.dumps(value), durable=True)

    def load_json(self, name: str):
        p = self.dir / name
        return json.loads(p.read_text()) if p.exists() else None

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def space_needed(path: Path, fingerprint: dict, computed: tuple[int, int], stored: tuple[int, int]) -> int:
    """Bytes an extraction still needs on disk: the batch files of the (labelled, test) images it
    computes, less those already saved, and the cache file of all the images it stores, which
    they (and an updated cache's rows) are copied into at the end; the old cache stays until the
    final rename, so its room is not counted as free."""
    def size(images: int, test_images: int) -> int:
        item = np.dtype(fingerprint.get("dtype", "float32")).itemsize
        image_passes = (1 + int(fingerprint["passes"])) * images + (1 + int(fingerprint["tta_passes"])) * test_images
        features = item * int(fingerprint["feature_dim"]) * image_passes
        if fingerprint.get("cut"):  # activations entering the top blocks (features/cut.py)
            features += cut_bytes(fingerprint["cut"], image_passes)
        return features

    folder = partial_dir(path)
    saved = sum(p.stat().st_size for p in folder.iterdir()) if folder.is_dir() else 0
    return max(0, size(*computed) - saved) + size(*stored)
