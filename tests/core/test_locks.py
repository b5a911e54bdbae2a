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
