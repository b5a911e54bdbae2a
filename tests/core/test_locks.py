"""core.locks: one writer per artifact, stale locks taken over, other hosts' locks respected."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from dogtl.core.errors import DogtlError, LockedError
from dogtl.core.locks import _boot_id, _owner, artifact_lock, hold, lock_path, writes


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(artifact, **fields):
    owner = {**_owner(), **fields}
    lock_path(artifact).write_text(json.dumps(owner))
    return owner


def test_lock_file_beside_the_artifact_holds_the_writer_and_goes_away(tmp_path):
    artifact = tmp_path / "c.h5"
    with artifact_lock(artifact, "the cache") as path:
        assert path == tmp_path / "c.h5.lock"
        owner = json.loads(path.read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        assert owner["boot_id"] == _boot_id() and owner["started"]
    assert not path.exists()


def test_a_live_writer_is_refused_with_its_pid_and_start(tmp_path):
    artifact = tmp_path / "m.keras"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        from dogtl.core.locks import _start_ticks

        _write_lock(artifact, pid=sleeper.pid, start_ticks=_start_ticks(sleeper.pid), started="2026-01-02T03:04:05")
        with pytest.raises(LockedError) as e:
            with artifact_lock(artifact, "the model"):
                pass
        message = str(e.value)
        assert isinstance(e.value, DogtlError)
        assert f"another dogtl process (pid {sleeper.pid}, started 2026-01-02T03:04:05) is writing the model" in message
        assert str(artifact) in message and "wait for it or stop it" in message
        assert lock_path(artifact).exists()  # the live writer's lock is left alone
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("how", ["killed", "rebooted", "pid reused"])
def test_a_stale_lock_is_taken_over_with_a_note(tmp_path, caplog, how):
    artifact = tmp_path / "c.h5"
    fields = {"killed": {"pid": _dead_pid()},
              "rebooted": {"pid": os.getpid(), "boot_id": "another-boot"},
              "pid reused": {"pid": os.getpid(), "start_ticks": "1"}}[how]
    _write_lock(artifact, **fields)
    with caplog.at_level(logging.WARNING, logger="dogtl.core.locks"):
        with artifact_lock(artifact, "the cache") as path:
            assert json.loads(path.read_text())["pid"] == os.getpid()
    assert "taking over the stale lock" in caplog.text
    assert not lock_path(artifact).exists()


def test_another_hosts_lock_is_refused_naming_host_and_file(tmp_path):
    artifact = tmp_path / "features.shard-1-of-2.h5"
    _write_lock(artifact, host="other-machine", pid=1)
    with pytest.raises(LockedError, match=r"pid 1 on other-machine.*delete .*shard-1-of-2\.h5\.lock"):
        with artifact_lock(artifact):
            pass
    # one lock per shard file: the other shard is free
    with artifact_lock(tmp_path / "features.shard-2-of-2.h5"):
        pass


def test_reentrant_in_one_process_and_released_by_writes(tmp_path):
    artifact = tmp_path / "out"

    @writes
    def stage(fail: bool):
        hold(artifact, "the folder")
        hold(artifact, "the folder")  # the demo's stages lock what they write, inside the demo
        assert lock_path(artifact).exists()
        if fail:
            raise DogtlError("boom")

    stage(False)
    assert not lock_path(artifact).exists()
    with pytest.raises(DogtlError):
        stage(True)
    assert not lock_path(artifact).exists()
    with pytest.raises(RuntimeError, match="outside a @writes"):
        hold(artifact)


def test_two_processes_racing_for_one_lock_one_wins(tmp_path):
    """Eight processes start together on one artifact (with a stale lock to take over): exactly
    one holds it, the others are refused."""
    artifact = tmp_path / "c.h5"
    _write_lock(artifact, pid=_dead_pid())
    script = textwrap.dedent(f"""
        import sys, time
        from dogtl.core.errors import LockedError
        from dogtl.core.locks import artifact_lock
        time.sleep(max(0, {__import__('time').time() + 1.5} - time.time()))
        try:
            with artifact_lock({str(artifact)!r}):
                time.sleep(3.0)
            print("won")
        except LockedError:
            print("refused")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(8)]
    outcomes = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outcomes.count("won") == 1, outcomes
    assert outcomes.count("refused") == 7, outcomes


def test_a_lock_that_cannot_be_written_leaves_no_empty_lock_behind(tmp_path, monkeypatch):
    """Found by benchmarks/faults.py: on a full disk the lock file was created but stayed empty,
    and the rerun with room was refused as 'another process is starting to write'."""
    import errno

    from dogtl.core import locks
    from dogtl.core.errors import os_error_message

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    artifact = tmp_path / "features.h5"
    with monkeypatch.context() as m:
        m.setattr(locks.os, "fsync", full)
        with pytest.raises(OSError) as caught:
            with artifact_lock(artifact, "the feature cache"):
                pass
    assert not lock_path(artifact).exists()
    assert os_error_message(caught.value).startswith(f"{lock_path(artifact)}: the disk is full")
    with artifact_lock(artifact, "the feature cache"):  # the rerun, with room again
        assert lock_path(artifact).exists()


# --- what writers that are gone leave behind (issue 27) --------------------------------------

def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _older(path, seconds: float = 60):
    os.utime(path, (path.stat().st_mtime - seconds,) * 2)


def test_taking_the_lock_removes_a_gone_writers_temporaries_and_nobody_elses(tmp_path):
    """Beside the artifact, inside it (a folder) and in its progress folder: the temporaries of a
    process that is not running go; those of live processes, of other artifacts and the resumable
    progress stay."""
    dead, live = _dead_pid(), os.getpid()
    model = tmp_path / "head.keras"
    for name in (f"head.tmp-{dead}.history.csv", f"head.tmp-{dead}.tmp-{dead}.png", f"head.tmp-{live}.json",
                 f"finetuned.tmp-{dead}.keras", "head.keras.tmp", "notes.tmp", "head.json",
                 "head.keras.lock.takeover"):  # a taker of a stale lock killed in its milliseconds
        (tmp_path / name).write_text("x")
    (tmp_path / f"1.tmp-{dead}").mkdir()  # an export's folder: another artifact's, left alone here
    progress = tmp_path / "head.keras.partial"
    progress.mkdir()
    for name in ("state.json", f"epoch-0002.tmp-{dead}.keras", "labelled-p0-000000000-000000004.npz.tmp"):
        (progress / name).write_text("x")
    with artifact_lock(model, "the model"):
        pass
    assert _files(tmp_path) == sorted([f"1.tmp-{dead}", f"finetuned.tmp-{dead}.keras", "head.json",
                                       f"head.tmp-{live}.json", "head.keras.partial",
                                       "head.keras.partial/state.json", "notes.tmp"])

    sweep = tmp_path / "sweep"
    (sweep / "trials").mkdir(parents=True)
    for name in (f"trials/abc-f0.tmp-{dead}.json", "trials/abc-f1.json", f"results.tmp-{live}.csv"):
        (sweep / name).write_text("x")
    with artifact_lock(sweep, "the sweep folder"):
        pass
    assert _files(sweep) == ["results.tmp-%d.csv" % live, "trials", "trials/abc-f1.json"]


def test_a_temporary_older_than_the_process_now_under_its_pid_is_a_gone_writers(tmp_path):
    """A reused pid (or a reboot): the file was written before that process started."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        fresh, old = tmp_path / f"c.tmp-{sleeper.pid}.json", tmp_path / f"c.tmp-{sleeper.pid}.png"
        fresh.write_text("being written")
        old.write_text("left by a process of that pid before this one")
        _older(old, 3600)
        with artifact_lock(tmp_path / "c.json"):
            pass
        assert fresh.exists() and not old.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_progress_folder_goes_only_once_its_artifact_was_written_from_it(tmp_path):
    model, progress = tmp_path / "f.keras", tmp_path / "f.keras.partial"
    progress.mkdir()
    (progress / "state.json").write_text("{}")
    (progress / "epoch-0001.keras").write_text("a checkpoint")
    model.write_text("an older model, being replaced with --force")
    _older(model)
    with artifact_lock(model):
        pass
    assert (progress / "state.json").exists()  # resumable work of the killed --force run
    for name in ("state.json", "epoch-0001.keras"):
        _older(progress / name, 120)
    (progress / "epoch-0001.keras").unlink()  # its removal began, then a kill: the folder itself is newer
    with artifact_lock(model):  # the model was written after the last checkpoint: the run finished
        pass
    assert not progress.exists() and model.exists()


def test_a_refused_overwrite_tidies_after_a_gone_writer_but_never_a_live_one(tmp_path):
    """A run killed after its final rename left its lock and its progress folder; its rerun stops at
    'exists', and that is where they go. A live writer's are left alone."""
    from dogtl.core.files import check_overwrite

    model, progress = tmp_path / "f.keras", tmp_path / "f.keras.partial"
    progress.mkdir()
    (progress / "state.json").write_text("{}")
    _older(progress / "state.json")
    _older(progress)
    model.write_text("the finished model")
    _write_lock(model, pid=_dead_pid())
    with pytest.raises(DogtlError, match="f.keras exists: pass --force"):
        check_overwrite(model, force=False)
    assert _files(tmp_path) == ["f.keras"]

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        from dogtl.core.locks import _start_ticks

        progress.mkdir()
        _older(progress)  # as finished as above: only the live lock keeps it
        _write_lock(model, pid=sleeper.pid, start_ticks=_start_ticks(sleeper.pid))
        with pytest.raises(DogtlError, match="f.keras exists"):
            check_overwrite(model, force=False)
        assert _files(tmp_path) == ["f.keras", "f.keras.lock", "f.keras.partial"]
    finally:
        sleeper.kill()
        sleeper.wait()
