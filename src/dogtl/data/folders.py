"""Finding the images and labels of a data folder, and the validation split.

Three layouts are read:
- Kaggle's: labels.csv (an id and a label column, found by name or given) + train/<id>, the id
  with or without its extension; optional test/ and sample_submission.csv.
- ImageFolder's: train/<class>/* with val/<class>/* (also valid/, validation/) as the
  validation split, optional test/.
- One folder per class: DIR/<class>/*, optional DIR/test/.
Any image the readers decode counts (IMAGE_SUFFIXES). Structural problems raise DataError
naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dogtl.core.errors import DataError, SettingError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp"}  # what decode_image reads
KAGGLE_LABELS = "labels.csv"
SAMPLE_SUBMISSION = "sample_submission.csv"
KAGGLE_COLUMNS = ("id", "breed")  # the Dog Breed Identification competition's
# Column names recognised without --id-column / --label-column, most likely first.
ID_COLUMNS = ("id", "image_id", "image", "filename", "file_name", "file", "image_name", "img", "name", "path")
LABEL_COLUMNS = ("breed", "label", "class", "category", "target", "species", "class_name", "label_name", "y")
VAL_FOLDERS = ("val", "valid", "validation")


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
    is_val: np.ndarray | None = None  # the data's own validation split (ImageFolder's val/), else None
    columns: tuple[str, str] = KAGGLE_COLUMNS  # labels.csv's id and label columns


def content_hashes(paths) -> list[str]:
    """SHA-256 of each file's bytes: what identifies an image's content (a file that cannot be
    read gets "" and is tried, and reported, by the decoder). Read by threads: hashing releases
    the GIL, and a cold disk is the limit."""
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


def load_dataset(root: str | Path, id_column: str | None = None, label_column: str | None = None) -> Dataset:
    """The data folder's images, labels and test images, in whichever layout it is.
    `id_column`/`label_column` name labels.csv's columns when they cannot be recognised."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"data folder '{root}' not found: pass --data DIR holding labels.csv and train/ "
            "(Kaggle layout), train/<class>/ and val/<class>/ folders, or one sub-folder of images per class"
        )
    columns, is_val = KAGGLE_COLUMNS, None
    if (root / KAGGLE_LABELS).exists():
        ids, paths, names, columns = _read_kaggle(root, id_column, label_column)
        layout = "kaggle"
    elif _class_folders(root / "train"):
        ids, paths, names, is_val = _read_image_folder(root)
        layout = "imagefolder"
    else:
        ids, paths, names = _read_folders(root)
        layout = "folders"
    if (id_column or label_column) and layout != "kaggle":
        raise DataError(f"--id-column/--label-column name columns of {root / KAGGLE_LABELS}, which is not there "
                        f"({root} is in the {layout} layout): drop them")
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
                   tuple(test_ids), tuple(test_paths), sample, is_val, columns)


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


def find_columns(columns, csv, id_column: str | None = None, label_column: str | None = None) -> tuple[str, str]:
    """labels.csv's (id column, label column): the ones named, else recognised by name (any
    letter case; see ID_COLUMNS, LABEL_COLUMNS), else the two columns of a two-column file."""
    columns = [str(c) for c in columns]
    found = ", ".join(columns)
    for option, name in (("--id-column", id_column), ("--label-column", label_column)):
        if name is not None and name not in columns:
            raise DataError(f"{csv} has no column {name!r} ({option}; found: {found})")

    def recognised(names, taken=None):
        lower = {c.lower(): c for c in columns if c != taken}
        return next((lower[n] for n in names if n in lower), None)

    id_column = id_column or recognised(ID_COLUMNS, label_column)
    label_column = label_column or recognised(LABEL_COLUMNS, id_column)
    if len(columns) == 2:
        id_column = id_column or next(c for c in columns if c != label_column)
        label_column = label_column or next(c for c in columns if c != id_column)
    if id_column is None or label_column is None or id_column == label_column:
        what = " and ".join(w for w, c in (("the image ids", id_column), ("the labels", label_column)) if c is None)
        raise DataError(f"{csv}: cannot tell which column holds {what or 'the ids and which the labels'} (found: "
                        f"{found}): name them with --id-column NAME --label-column NAME")
    return id_column, label_column


def _read_kaggle(root: Path, id_column: str | None = None, label_column: str | None = None):
    csv = root / KAGGLE_LABELS
    try:
        table = pd.read_csv(csv, dtype=str)
    except pd.errors.EmptyDataError:
        raise DataError(f"{csv} is empty: it needs a header such as 'id,breed' and one row per image") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{csv}: cannot parse it as CSV ({e})") from None
    found = ", ".join(map(str, table.columns))
    id_col, label_col = find_columns(table.columns, csv, id_column, label_column)
    table = table.rename(columns={id_col: "id", label_col: "breed"})[["id", "breed"]]
    if table.empty:
        raise DataError(f"{csv} has a header but no rows: add one row per training image")
    blank = table.index[table["id"].isna() | table["breed"].isna()]
    if len(blank):
        raise DataError(f"{csv}: empty {id_col} or {label_col} in row(s) {_examples(blank + 1)} (counting from 1 "
                        "below the header): fill them in or remove the rows")
    table["id"], table["breed"] = table["id"].str.strip(), table["breed"].str.strip()
    dup = table["id"][table["id"].duplicated()].unique()
    if len(dup):
        raise DataError(f"{csv}: duplicate ids {_examples(dup)}: keep one row per image")
    train = root / "train"
    if not train.is_dir():
        raise DataError(f"{train} not found: the Kaggle layout keeps training images in train/<id>.jpg")
    paths = _image_files_by_id(train, list(table["id"]))
    absent = [i for i, p in zip(table["id"], paths) if p is None]
    if len(absent) == len(paths):
        raise DataError(f"{train} holds none of the {len(paths)} images named in {csv} (e.g. {absent[0]}): is it "
                        f"empty, or is another column the ids? (--id-column; found: {found})")
    if absent:
        raise DataError(
            f"{csv}: {len(absent)} ids have no image in {train} ({_examples(absent)}): "
            "add the files or remove their rows"
        )
    return list(table["id"]), paths, list(table["breed"]), (id_col, label_col)


def _image_files_by_id(folder: Path, ids: list[str]) -> list[Path | None]:
    """The file of each id in `folder`: `id` itself when it names an image file (`a.png`), else
    the one image `id.<any image suffix>`; None when there is none. The folder is listed once."""
    by_name, by_stem = {}, {}
    for p in _images_in(folder):
        by_name[p.name] = p
        by_stem.setdefault(p.stem, []).append(p)
    paths = []
    for i in ids:
        found = by_name.get(i) or by_stem.get(i, [None])
        if isinstance(found, list):
            if len(found) > 1:
                raise DataError(f"{folder}: several images for id {i} ({', '.join(p.name for p in found)}): "
                                "keep one file per id")
            found = found[0]
        if found is None and "/" in i:  # an id naming a sub-folder: train/<sub>/<name>
            found = next((c for c in [folder / i, *(folder / f"{i}{x}" for x in sorted(IMAGE_SUFFIXES))]
                          if c.is_file()), None)
        paths.append(found)
    return paths


def _class_folders(folder: Path) -> list[Path]:
    """The sub-folders of `folder` holding images (ImageFolder's classes), or none."""
    if not folder.is_dir():
        return []
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".") and _images_in(d))


def _read_image_folder(root: Path):
    """ImageFolder's train/<class>/ + val/<class>/: the val/ images are the validation split."""
    train = root / "train"
    ids, paths, names = _class_images(train, "train")
    val_dirs = [root / v for v in VAL_FOLDERS if (root / v).is_dir()]
    if len(val_dirs) > 1:
        raise DataError(f"{root}: both {' and '.join(d.name + '/' for d in val_dirs)}; keep one validation folder")
    is_val = None
    if val_dirs:
        val_ids, val_paths, val_names = _class_images(val_dirs[0], val_dirs[0].name)
        unknown = sorted(set(val_names) - set(names))
        if unknown:
            raise DataError(f"{val_dirs[0]}: class folder(s) {_examples(unknown)} have no images in {train}: "
                            "every validation class needs training images")
        is_val = np.array([False] * len(ids) + [True] * len(val_ids))
        ids, paths, names = ids + val_ids, paths + val_paths, names + val_names
    return ids, paths, names, is_val


def _class_images(folder: Path, prefix: str):
    ids, paths, names = [], [], []
    for d in _class_folders(folder):
        for p in _images_in(d):
            ids.append(f"{prefix}/{d.name}/{p.stem}")
            paths.append(p)
            names.append(d.name)
    _check_unique(ids, folder)
    return ids, paths, names


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
            f"no images found in '{root}': expected labels.csv + train/<id>.jpg (Kaggle layout), "
            "train/<class>/ + val/<class>/ (ImageFolder layout) or one sub-folder of images per class"
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
