"""Errors the CLI turns into one clear line and a non-zero exit."""

import errno
import os
import re


class DogtlError(ValueError):
    """A problem with the user's input or files that they can fix; the message says how."""


class DataError(DogtlError):
    """The data folder is structurally wrong (missing columns, files, duplicate ids...)."""


class CacheError(DogtlError):
    """A feature cache is missing, incomplete, damaged or was made with other settings."""


class DiskSpaceError(DogtlError):
    """Not enough free space for a write whose size is known before it starts."""


class LockedError(DogtlError):
    """Another live dogtl process is writing the same artifact."""


class DamagedError(CacheError):
    """A file's checksum or content hash does not match: it changed on disk after it was written."""


# Operating-system errors a user can fix, each with what to do about it.
_OS_ADVICE = {
    "ENOSPC": "the disk is full: free {need} on {mount} and rerun the same command: finished work is kept",
    "EDQUOT": "the disk quota is exceeded: free {need} on {mount} and rerun the same command: finished work is kept",
    "EACCES": "permission denied: make it writable (or choose another path) and rerun the same command: "
              "finished work is kept",
    "EPERM": "operation not permitted: make it writable (or choose another path) and rerun the same command: "
             "finished work is kept",
    "EROFS": "the file system is read-only: choose a path on a writable one (or remount it) and rerun the same "
             "command: finished work is kept",
    "EISDIR": "it is a folder, not a file: pass a file name",
    "ENOTDIR": "a part of the path is a file, not a folder: choose another path",
    "ENOENT": "no such file or folder: check the path",
    "EEXIST": "it already exists: pass --force to replace it or choose another path",
    "EMFILE": "too many open files: raise the limit (ulimit -n) and rerun the same command",
    "EIO": "input/output error (a failing disk or network file system): check it and rerun the same command",
}


def os_error_message(error: OSError) -> str | None:
    """One line for an operating-system error a user can fix (path, cause, what to do), else None."""
    code, path = error.errno, error.filename or ""
    if code is None:  # h5py's OSError carries the C library's errno and file in its message
        found = re.search(r"errno = (\d+)", str(error))
        code = int(found[1]) if found else None
        named = re.search(r"file ?name = '([^']*)'", str(error))
        path = path or (named[1] if named else "")
    name = errno.errorcode.get(code or -1)
    if name not in _OS_ADVICE:
        return None
    if error.strerror is None and code is not None:
        error = OSError(code, os.strerror(code), path)
    need, mount = "some space", "that disk"
    if name in ("ENOSPC", "EDQUOT"):
        mb = getattr(error, "dogtl_needed_mb", None)
        need = f"{mb:,.0f} MB" if mb else "space"
        mount = _mount_point(path) if path else "the disk it was writing to (the output's)"
    where = f"{path}: " if path else ""
    return f"{where}{_OS_ADVICE[name].format(need=need, mount=mount)} ({error.strerror or name})"


def _mount_point(path) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path) and path != os.path.dirname(path):
        path = os.path.dirname(path)
    while not os.path.ismount(path) and path != os.path.dirname(path):
        path = os.path.dirname(path)
    return path


class SettingError(DogtlError):
    """An option or setting has a value of the wrong type or outside what it accepts."""
