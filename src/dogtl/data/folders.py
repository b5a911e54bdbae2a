"""Finding the images and labels of a data folder, and the validation split.

Two layouts are read: Kaggle's (labels.csv with id,breed + train/<id>.jpg, optional
test/ and sample_submission.csv) and one folder per class (DIR/<class>/*.jpg,
optional DIR/test/). Structural problems raise DataError naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dogtl.core.errors import DataError, SettingError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif"}
KAGGLE_LABELS = "labels.csv"
SAMPLE_SUBMISSION = "sample_submission.csv"


@dataclass(frozen=True)
class Dataset:
    root: Path
    layout: str  # "kaggle" or "folders"
    classes: tuple[str, ...]
    ids: tuple[str, ...]
    paths: tuple[Path, ...]
    labels: np.ndarray  # int32 index into classes
    test_ids: tuple[str, ...]
    test_paths: tuple[Path, ...]
    sample_submission: Path | None


def content_hashes(paths) -> list[str]:
    """SHA-256 of each file's bytes: what identifies an image's content (a file that cannot be
    read gets "" and is tried, and reported, by the decoder). Read by threads: hashing releases
    the GIL, and a cold disk is the limit."""
    from concurrent.futures import ThreadPoolExecutor

    def digest(path) -> str:
        try:
            with open(path, "rb") as f:
                return hashlib.file_digest(f, "sha256").hexdigest()
        except OSError:
            return ""

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(digest, paths, chunksize=64))


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _check_unique(ids, where) -> None:
    seen, dup = set(), []
    for i in ids:
        if i in seen:
            dup.append(i)
        seen.add(i)
    if dup:
        raise DataError(f"{where}: duplicate image ids {_examples(sorted(set(dup)))} (same name, different "
                        "extension?): keep one file per id")


def _examples(items, n=3) -> str:
    items = list(items)
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(str(x) for x in items[:n]) + more


def load_dataset(root: str | Path) -> Dataset:
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"data folder '{root}' not found: pass --data DIR holding labels.csv and train/ "
            "(Kaggle layout) or one sub-folder of images per class"
        )
    if (root / KAGGLE_LABELS).exists():
        ids, paths, names = _read_kaggle(root)
        layout = "kaggle"
    else:
        ids, paths, names = _read_folders(root)
        layout = "folders"
    classes = tuple(sorted(set(names)))
    if len(classes) < 2:
        raise DataError(f"'{root}' has a single class ({classes[0]}): a classifier needs at least two")
    index = {c: k for k, c in enumerate(classes)}
    labels = np.array([index[n] for n in names], dtype=np.int32)

    test_dir = root / "test"
    test_paths = _images_in(test_dir) if test_dir.is_dir() else []
    test_ids = [p.stem for p in test_paths]
    _check_unique(test_ids, test_dir)
    sample = root / SAMPLE_SUBMISSION
    sample = sample if sample.exists() else None
    if sample is not None:
        check_submission_columns(sample, classes)
    return Dataset(root, layout, classes, tuple(ids), tuple(paths), labels,
                   tuple(test_ids), tuple(test_paths), sample)


def check_submission_columns(sample: Path, classes) -> list[str]:
    """The class columns of sample_submission.csv, which must be exactly our classes."""
    try:
        columns = list(pd.read_csv(sample, nrows=0).columns)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{sample}: cannot read it as CSV ({e}); fix or remove the file") from None
    if not columns or columns[0] != "id":
        raise DataError(f"{sample}: first column must be 'id', found {columns[:1]}")
    have, want = set(columns[1:]), set(classes)
    if have != want:
        parts = []
        if want - have:
            parts.append(f"missing {_examples(sorted(want - have))}")
        if have - want:
            parts.append(f"unknown {_examples(sorted(have - want))}")
        raise DataError(
            f"{sample}: class columns do not match the labels ({'; '.join(parts)}): "
            "fix the file or remove it"
        )
    return columns[1:]


def _read_kaggle(root: Path):
    csv = root / KAGGLE_LABELS
    try:
        table = pd.read_csv(csv, dtype=str)
    except pd.errors.EmptyDataError:
        raise DataError(f"{csv} is empty: it needs a header 'id,breed' and one row per image") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{csv}: cannot parse it as CSV ({e})") from None
    missing = [c for c in ("id", "breed") if c not in table.columns]
    if missing:
        raise DataError(
            f"{csv} lacks column(s) {', '.join(missing)} (found: {', '.join(map(str, table.columns))}): "
            "it needs columns id and breed"
        )
    if table.empty:
        raise DataError(f"{csv} has a header but no rows: add one row per training image")
    blank = table.index[table["id"].isna() | table["breed"].isna()]
    if len(blank):
        raise DataError(f"{csv}: empty id or breed in row(s) {_examples(blank + 1)} (counting from 1 "
                        "below the header): fill them in or remove the rows")
    table["id"], table["breed"] = table["id"].str.strip(), table["breed"].str.strip()
    dup = table["id"][table["id"].duplicated()].unique()
    if len(dup):
        raise DataError(f"{csv}: duplicate ids {_examples(dup)}: keep one row per image")
    train = root / "train"
    if not train.is_dir():
        raise DataError(f"{train} not found: the Kaggle layout keeps training images in train/<id>.jpg")
    paths = [train / f"{i}.jpg" for i in table["id"]]
    absent = [p.name for p in paths if not p.is_file()]
    if len(absent) == len(paths):
        raise DataError(f"{train} holds none of the {len(paths)} images named in {csv}: is it empty?")
    if absent:
        raise DataError(
            f"{csv}: {len(absent)} ids have no image in {train} ({_examples(absent)}): "
            "add the files or remove their rows"
        )
    return list(table["id"]), paths, list(table["breed"])


def _read_folders(root: Path):
    class_dirs = sorted(d for d in root.iterdir()
                        if d.is_dir() and d.name != "test" and not d.name.startswith("."))
    ids, paths, names = [], [], []
    for d in class_dirs:
        for p in _images_in(d):
            ids.append(f"{d.name}/{p.stem}")
            paths.append(p)
            names.append(d.name)
    if not paths:
        raise DataError(
            f"no images found in '{root}': expected labels.csv + train/<id>.jpg (Kaggle layout) "
            "or one sub-folder of .jpg/.png images per class"
        )
    found = set(names)
    empty = [d.name for d in class_dirs if d.name not in found]
    if empty:
        log.warning("ignoring %d class folder(s) without images: %s", len(empty), _examples(empty))
    _check_unique(ids, root)
    return ids, paths, names


def _draw(seed: int, image_id: str) -> float:
    """A uniform number in [0, 1) that depends only on (seed, image id)."""
    digest = hashlib.sha256(f"split\0{seed}\0{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_validation(ids, labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Validation mask: an image is in validation when its own draw (seed, id) is below
    `val_fraction`, so adding, removing or relabelling other images never moves it, and
    incremental and fresh extractions agree. Each class gives `val_fraction` of its images on
    average (stratified in expectation, not exactly: a small class may have none). One guard,
    the only way an image's side can depend on the others: a class never goes wholly to
    validation, its highest draw training (a class of one always trains)."""
    if not 0.0 <= val_fraction < 1.0:
        raise SettingError(f"--val-fraction {val_fraction} must be in [0, 1)")
    labels = np.asarray(labels)
    if val_fraction == 0.0 or not len(labels):
        return np.zeros(len(labels), dtype=bool)
    draws = np.array([_draw(seed, i) for i in ids], dtype=np.float64)
    is_val = draws < val_fraction
    order = np.lexsort((draws, labels))  # by class, then by draw
    starts = np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1]])
    singles = 0
    for members in np.split(order, starts[1:]):
        singles += len(members) == 1
        if is_val[members].all():
            is_val[members[-1]] = False
    if singles:
        log.warning("%d class(es) have a single image; it stays in the training split", singles)
    if not is_val.any():
        log.warning("no image drew a validation place (%d images, --val-fraction %g): later stages get no "
                    "validation split; pass a larger --val-fraction", len(labels), val_fraction)
    return is_val
