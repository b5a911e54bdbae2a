"""Writing files so that a crash leaves the old file or the new one, never half of one,
and refusing to overwrite what a user made unless they say --force.

Every file dogtl writes (models, metadata, CSV and JSON reports, plots, feature caches,
sweep records) goes through `atomic_path`: the content is written to a temporary sibling
(same folder, so the final rename stays on one file system) and renamed over the target
at the end. This module is the only place that renames a file into place, and the one that
knows the names of temporaries: `leftovers` finds what a writer that is gone left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import ExitStack, contextmanager
from pathlib import Path

from dogtl.core.errors import DogtlError

_OF_PROCESS = re.compile(r"\.tmp-(\d+)(\.|$)")  # what temporary_sibling adds: the writer's pid


def temporary_sibling(path: str | Path) -> Path:
    """A name beside `path`, unique to this process, ending as `path` does from its first dot
    (Keras and matplotlib pick the format from the ending, Keras's `.weights.h5` included)."""
    path = Path(path)
    stem, dot, ending = path.name.partition(".")
    return path.with_name(f"{stem}.tmp-{os.getpid()}{dot}{ending}")


def fixed_temporary(path: str | Path) -> Path:
    """`<name>.tmp`: one per file whatever the process, for work a rerun overwrites (the feature
    cache and its saved batches)."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def progress_folder(path: str | Path) -> Path:
    """`<name>.partial/`: the saved progress of a long write of `path` (extraction batches,
    fine-tuning checkpoints), which a rerun resumes from until `path` is written."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def leftovers(artifact: str | Path, gone) -> list[Path]:
    """What writers of `artifact` that are gone left behind: their temporaries beside it
    (`<stem>.tmp-<pid>...`, `<name>.tmp`), inside it (a folder) and in its progress folder, and the
    progress folder itself once `artifact` was written after its last change (a run killed between
    its final rename and the folder's removal; before that, the folder is what a rerun resumes).

    `gone(pid, mtime)` says whether process `pid` is certainly not the one that last wrote a file
    at `mtime`: only such pids' temporaries are listed, so a live writer's never are. Call this
    only while holding the artifact's lock (core.locks): no one else writes its fixed names."""
    artifact = Path(artifact)
    stem, progress = artifact.name.partition(".")[0], progress_folder(artifact)

    def of_gone_process(entry: Path) -> bool:
        match = _OF_PROCESS.search(entry.name)
        try:
            return bool(match) and gone(int(match[1]), entry.lstat().st_mtime)
        except FileNotFoundError:
            return False

    def within(folder: Path, fixed_too: bool) -> list[Path]:
        found = []
        for entry in _entries(folder):
            if of_gone_process(entry) or (fixed_too and entry.name.endswith(".tmp")):
                found.append(entry)
            elif entry.is_dir() and not entry.is_symlink():
                found += within(entry, fixed_too)
        return found

    found = [entry for entry in _entries(artifact.parent)
             if entry.name == fixed_temporary(artifact).name
             or (entry.name.startswith(f"{stem}.tmp-") and of_gone_process(entry))]
    if artifact.is_dir() and not artifact.is_symlink():
        found += within(artifact, fixed_too=False)
    if progress.is_dir():
        finished = artifact.is_file() and artifact.stat().st_mtime_ns > _newest_file(progress)
        found += [progress] if finished else within(progress, fixed_too=True)
    return found


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError:  # gone, not a folder, or not ours to list: nothing to tidy there
        return []


def _newest_file(folder: Path) -> int:
    """The last write to a file in `folder` (not the folder's own time: removing files changes
    that, and a removal interrupted half-way must still count as finished)."""
    newest = 0
    for entry in folder.rglob("*"):
        try:
            if entry.is_file():
                newest = max(newest, entry.lstat().st_mtime_ns)
        except FileNotFoundError:
            pass
    return newest


@contextmanager
def atomic_path(path: str | Path, tmp: str | Path | None = None, durable: bool = False):
    """Yield a temporary path to write; on success it replaces `path`, on error it is removed.

    `tmp` fixes the temporary name where a rerun must find or overwrite what a killed run
    left (the feature cache); `durable` fsyncs the file before the rename, for files whose
    loss in an operating-system crash would cost more than the fsync.
    """
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else temporary_sibling(path)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if not e.filename:  # a writer that does not say which file (Keras's zip on a full disk)
            e.filename = str(path)
        raise
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_paths(*paths: str | Path):
    """Temporary paths for files that belong together (a model and its metadata): none is
    renamed into place until every one is written, so a failed write leaves all the old files.
    (Only a crash in the microseconds between the renames could still mix old and new.)"""
    with ExitStack() as stack:
        yield [stack.enter_context(atomic_path(p)) for p in paths]


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MB blocks (models, weights files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)


def write_text_atomic(path: str | Path, text: str, durable: bool = False) -> None:
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_text(text)


def json_text(value, indent: int = 2) -> str:
    """dogtl's JSON: sorted keys, NumPy scalars as numbers, anything else unknown as its str."""
    return json.dumps(value, indent=indent, sort_keys=True, default=_json_default)


def write_json_atomic(path: str | Path, value, indent: int = 2, durable: bool = False) -> None:
    write_text_atomic(path, json_text(value, indent), durable=durable)


def write_csv_atomic(frame, path: str | Path, **kwargs) -> None:
    """A pandas DataFrame as CSV, without its index."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, **kwargs)


def check_overwrite(path: str | Path, force: bool, option: str = "--out", detail: str = "") -> Path:
    """Refuse, before any work is done, to replace an existing file without --force; make the
    folder it goes in when there is none yet (every output, whatever the command).
    `detail` says more about what is there (" and is not a dogtl feature cache")."""
    path = Path(path)
    make_folder(path.parent, option)
    if path.is_dir():
        raise DogtlError(f"{path} is a folder: pass a file name or choose another {option}")
    if path.exists() and not force:
        from dogtl.core.locks import tidy

        tidy(path)  # a writer killed after its final rename left its lock or progress folder
        raise DogtlError(f"{path} exists{detail}: pass --force to overwrite it or choose another {option}")
    return path


def make_folder(folder: str | Path, option: str = "--out") -> Path:
    """`folder` and its parents, made if missing; a file in the way is one clear error."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise DogtlError(f"{folder}: a part of this path is a file, not a folder; choose another {option}") from None
    return folder
