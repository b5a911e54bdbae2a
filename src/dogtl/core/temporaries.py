"""The names writers give their temporaries, and finding those a writer that is gone left behind.

`temporary_sibling` (`<stem>.tmp-<pid>...`: one per process, core.files' atomic writes),
`fixed_temporary` (`<name>.tmp`: one per file) and `progress_folder` (`<name>.partial/`: what a
rerun resumes). Below both core.files (which writes them) and core.locks (whose first writer of
an artifact removes a gone writer's `leftovers`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

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
