"""One writer per artifact: a lock file beside every cache, shard, model, sweep folder or report
while a command writes it.

`<artifact>.lock` is created with O_CREAT|O_EXCL (atomic on local file systems and on NFS v3+,
the shared file systems `--shard` runs use), and holds the writer's pid, host, boot id, process
start time and command line as JSON. A second writer of the same artifact refuses at once
(`LockedError`); readers never look at locks, so a finished artifact never blocks them.

A lock whose process is gone (kill -9, a reboot: other boot id, or a pid now used by another
process: other start time) is taken over, with a logged note. A lock taken on another host
cannot be checked from here and is refused, naming the host and the file to delete.

Whoever takes an artifact's lock first removes what writers of it that are gone left behind
(core.temporaries.leftovers: temporaries of processes that are not running, a finished run's progress
folder), and so does a command refusing to overwrite an existing artifact (`tidy`): a run killed
at any moment leaves nothing once the same command has run again.

Stage functions mark themselves `@writes` and call `hold(path, what)` where they know what they
write: the locks they hold are released when the function returns or raises.
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import os
import shutil
import socket
import sys
import time
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path

from dogtl.core.errors import LockedError
from dogtl.core.temporaries import leftovers

log = logging.getLogger(__name__)
CREATING_GRACE_S = 10.0  # an empty lock file younger than this is a writer still filling it in
_held: dict[Path, int] = {}  # locks this process holds (re-entrant: the demo runs stages that lock)
_scope: contextvars.ContextVar[ExitStack | None] = contextvars.ContextVar("dogtl_lock_scope", default=None)


def lock_path(artifact: str | Path) -> Path:
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + ".lock")


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), telling a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _started_at(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch, rounded down), or None if unknown."""
    try:
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(_start_ticks(pid)) / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError):
        return None


def _gone(pid: int, mtime: float) -> bool:
    """Process `pid` cannot have written a file last changed at `mtime`: it is not running, or the
    process now running under that pid started after the change (a reused pid, a reboot)."""
    if not _alive(pid):
        return True
    started = _started_at(pid)
    return started is not None and started > mtime + 1.0


def _remove_leftovers(artifact: Path, what: str) -> None:
    """Called holding the artifact's lock. A take-over guard is of no use while the lock's owner
    is alive (no one takes over a live lock): one found now was left by a killed taker."""
    _guard(lock_path(artifact)).unlink(missing_ok=True)
    found = leftovers(artifact, _gone)
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if found:
        log.warning("removed what an earlier writer of %s %s left behind: %s", what, artifact,
                    ", ".join(p.name for p in found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else ""))


def _owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": _boot_id(),
            "start_ticks": _start_ticks(os.getpid()),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500]}


def _read(path: Path) -> dict | None:
    """The lock's owner; {} for a lock being written or unreadable; None when there is no lock."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        owner = json.loads(text)
        return owner if isinstance(owner, dict) else {}
    except json.JSONDecodeError:
        return {}


def stale_reason(owner: dict, path: Path) -> str | None:
    """Why the lock's writer is certainly gone, or None while it may still be writing."""
    if not owner:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return "it is gone"
        return f"it is empty and {age:.0f} s old" if age > CREATING_GRACE_S else None
    if owner.get("host") != socket.gethostname():
        return None  # another machine's process: cannot be checked from here
    if owner.get("boot_id") and owner.get("boot_id") != _boot_id():
        return "the machine was restarted since"
    pid = int(owner.get("pid", -1))
    if pid <= 0 or not _alive(pid):
        return f"process {pid} is gone"
    if owner.get("start_ticks") and owner.get("start_ticks") != _start_ticks(pid):
        return f"pid {pid} is now another process"
    return None


def _create(path: Path, owner: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(owner, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a full disk: an empty lock left behind would refuse the rerun
        path.unlink(missing_ok=True)
        e.filename = e.filename or str(path)
        raise
    return True


def _guard(path: Path) -> Path:
    return path.with_name(path.name + ".takeover")


def _take_over(path: Path, owner: dict, reason: str, what: str) -> None:
    """Remove a stale lock, unless another process replaced it meanwhile: the removal is guarded
    by `<lock>.takeover` (created exclusively) and the lock is read again under the guard."""
    guard = _guard(path)
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:  # a taker killed while holding the guard leaves it: the guard's life is milliseconds
            if time.time() - guard.stat().st_mtime > CREATING_GRACE_S:
                guard.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        return
    os.close(fd)
    try:
        if _read(path) == owner:
            path.unlink(missing_ok=True)
            log.warning("taking over the stale lock %s on %s: %s (pid %s on %s, started %s)", path, what,
                        reason, owner.get("pid", "?"), owner.get("host", "?"), owner.get("started", "?"))
    finally:
        guard.unlink(missing_ok=True)


@contextmanager
def artifact_lock(artifact: str | Path, what: str = "it"):
    """Hold `<artifact>.lock` for the block; raise LockedError at once if another live process holds it."""
    artifact = Path(artifact).absolute()
    path = lock_path(artifact)
    if _held.get(path):
        _held[path] += 1
        try:
            yield path
        finally:
            _held[path] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = _owner()
    for _ in range(20):
        if _create(path, mine):
            break
        owner = _read(path)
        if owner is None:
            continue  # released meanwhile: try again
        reason = stale_reason(owner, path)
        if reason is None:
            raise LockedError(_refusal(owner, artifact, what, path))
        _take_over(path, owner, reason, what)
    else:
        raise LockedError(f"{path}: could not take the lock on {what} {artifact}; rerun the command")
    _held[path] = 1
    try:
        _remove_leftovers(artifact, what)
        yield path
    finally:
        _held.pop(path, None)
        if _read(path) == mine:  # never remove a lock another process took over
            path.unlink(missing_ok=True)


def _refusal(owner: dict, artifact: Path, what: str, path: Path) -> str:
    if not owner:
        return (f"another dogtl process is starting to write {what} {artifact}; wait for it or stop it "
                f"(if none is running, delete {path})")
    here = owner.get("host") == socket.gethostname()
    where = "" if here else f" on {owner.get('host', '?')}"
    hint = "" if here else f" (if it is no longer running there, delete {path})"
    return (f"another dogtl process (pid {owner.get('pid', '?')}{where}, started {owner.get('started', '?')}) "
            f"is writing {what} {artifact}; wait for it or stop it{hint}")


def tidy(artifact: str | Path, what: str = "the file") -> None:
    """Remove what writers of `artifact` that are gone left behind, unless a live one holds it
    (a command that refuses to overwrite the artifact calls this: a run killed after its final
    rename left its lock, its progress folder or temporaries, and its rerun stops there)."""
    artifact = Path(artifact).absolute()
    if lock_path(artifact).exists() or leftovers(artifact, _gone):
        try:
            with artifact_lock(artifact, what):
                pass
        except (LockedError, OSError):  # a live writer's, or a folder we cannot write: left alone
            pass


def writes(function):
    """Mark a stage function as a writer: the locks it takes with `hold` are released when it ends."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with ExitStack() as stack:
            token = _scope.set(stack)
            try:
                return function(*args, **kwargs)
            finally:
                _scope.reset(token)
    return wrapper


def hold(artifact: str | Path, what: str = "it") -> Path:
    """Take the lock on `artifact` until the enclosing `@writes` function ends."""
    stack = _scope.get()
    if stack is None:
        raise RuntimeError("dogtl.core.locks.hold() outside a @writes function (a bug in dogtl)")
    return stack.enter_context(artifact_lock(artifact, what))
