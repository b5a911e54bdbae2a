"""core.errors: which errors are a user's to fix (one line) and what the line says."""

from __future__ import annotations

import errno

import pytest

from dogtl.core.errors import DogtlError, SettingError, os_error_message


@pytest.mark.parametrize("code, needles", [
    (errno.ENOSPC, ["/data/c.h5: the disk is full: free space on /", "finished work is kept"]),
    (errno.EACCES, ["/data/c.h5: permission denied: make it writable"]),
    (errno.EPERM, ["operation not permitted"]),
    (errno.EROFS, ["the file system is read-only: choose a path on a writable one"]),
    (errno.EISDIR, ["it is a folder, not a file: pass a file name"]),
])
def test_fixable_os_errors_name_path_cause_and_what_to_do(code, needles):
    import os

    message = os_error_message(OSError(code, os.strerror(code), "/data/c.h5"))
    for needle in needles:
        assert needle in message
    assert os.strerror(code) in message and "\n" not in message


def test_h5py_errors_carry_errno_and_file_in_their_message():
    h5py_style = OSError("Unable to synchronously write data (file write failed: time = Wed Dec  2 2026, "
                         "filename = '/x/c.h5.tmp', file descriptor = 5, errno = 28, error message = "
                         "'No space left on device', buf = 0x1)")
    assert os_error_message(h5py_style).startswith("/x/c.h5.tmp: the disk is full")


def test_h5py_errors_with_an_errno_are_one_line_naming_the_file():
    """h5py (Keras's save_weights on a full disk) sets errno but no filename, and its message
    holds a newline (the C library's time stamp)."""
    h5py_style = OSError(errno.ENOSPC, "Can't synchronously write data (file write failed: time = Fri Dec  4 "
                         "13:13:31 2026\n, filename = '/m/c.tmp-1.random-backbone.weights.h5', file descriptor = 3, "
                         "errno = 28, error message = 'No space left on device', buf = 0x7f)")
    message = os_error_message(h5py_style)
    assert message.startswith("/m/c.tmp-1.random-backbone.weights.h5: the disk is full")
    assert message.endswith("(No space left on device)") and "\n" not in message


def test_other_os_errors_are_not_a_users_to_fix():
    assert os_error_message(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")) is None
    assert os_error_message(OSError("Unable to open object (bad symbol table)")) is None


def test_setting_errors_are_dogtl_errors_and_one_class():
    from dogtl.core import settings

    assert settings.SettingError is SettingError and issubclass(SettingError, DogtlError)
