"""cli.common: Ctrl-C and SIGTERM end a command as an interruption wherever they land, found by
benchmarks/faults.py (one was dropped inside a TensorFlow finalizer, one surfaced as a SystemError
from TensorFlow's C code and was reported as a bug)."""

from __future__ import annotations

import errno
import gc
import os
import signal
import sys
import time

import pytest
import typer

from dogtl.cli.common import friendly_errors


def test_a_ctrl_c_that_lands_in_a_finalizer_is_not_lost(capsys):
    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs here, inside __del__, where Python drops exceptions

    @friendly_errors
    def command():
        Finalized()  # dropped at once
        time.sleep(3)  # the signal, sent again, interrupts this
        return "finished"

    with pytest.raises(typer.Exit) as caught:
        command()
    assert caught.value.exit_code == 130
    assert "interrupted: finished work is kept" in capsys.readouterr().err


def test_an_error_a_sigterm_caused_is_an_interruption_not_a_bug(capsys):
    @friendly_errors
    def command():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(3)
        except KeyboardInterrupt:  # as TensorFlow's C code turned it, mid-trace
            raise SystemError("Objects/listobject.c:338: bad argument to internal function") from None

    with pytest.raises(typer.Exit) as caught:
        command()
    err = capsys.readouterr().err
    assert caught.value.exit_code == 143
    assert "terminated: finished work is kept" in err and "bug" not in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the previous handler is back


def test_without_a_signal_an_unexpected_error_is_still_a_bug(capsys):
    @friendly_errors
    def command():
        raise SystemError("a real bug")

    with pytest.raises(typer.Exit) as caught:
        command()
    assert caught.value.exit_code == 1
    assert "this is a bug in dogtl" in capsys.readouterr().err


def test_a_full_disk_is_one_line_without_the_complaints_of_h5py_objects_freed_after_it(capsys, monkeypatch):
    """Keras's save_weights on a full disk: h5py objects of the unwritable file raise again as
    they are freed (through sys.unraisablehook), while the error unwinds and after the one-line
    message; found by faults.py."""
    passed_on = []
    monkeypatch.setattr(sys, "unraisablehook", passed_on.append)

    class Unflushed:
        def __init__(self, text):
            self.text = text

        def __del__(self):
            raise RuntimeError(self.text)

    @friendly_errors
    def command():
        Unflushed("Can't decrement id ref count (file write failed: time = Fri Dec  4 2026\n, errno = 28)")  # freed now
        held = [Unflushed("Can't decrement id ref count (file write failed: time = Fri Dec  4 2026\n, errno = 28)"),
                Unflushed("something else")]  # noqa: F841  freed with the traceback's frames
        raise OSError(errno.ENOSPC, "No space left on device", "/m/c.weights.h5")

    with pytest.raises(typer.Exit) as caught:
        command()
    assert caught.value.exit_code == 1
    del caught
    gc.collect()
    err = capsys.readouterr().err
    assert err.startswith("error: /m/c.weights.h5: the disk is full") and err.count("\n") == 1
    assert [str(u.exc_value) for u in passed_on] == ["something else"]  # any other is still shown
