"""Refusing a long write early when the disk cannot hold it, instead of failing hours in."""

from __future__ import annotations

import shutil
from pathlib import Path

from dogtl.core.errors import DiskSpaceError

MB = 1024 * 1024


def free_bytes(path: str | Path) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def require_free_space(path: str | Path, needed_bytes: int, what: str, margin: float = 1.05) -> None:
    """Raise DiskSpaceError naming `what`, the sizes and what to do unless the file system
    holding `path` has `needed_bytes` (times `margin`) free."""
    free = free_bytes(path)
    if free < needed_bytes * margin:
        raise DiskSpaceError(
            f"{what} needs about {needed_bytes / MB:,.0f} MB at {path} but only {free / MB:,.0f} MB "
            f"are free there; free {max(needed_bytes * margin - free, 0) / MB:,.0f} MB (or choose "
            f"another path) and rerun the same command: finished work is kept"
        )
