"""Native libraries' chatter kept off the user's screen."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager


@contextmanager
def native_stderr_silenced():
    """File descriptor 2 sent to /dev/null while the block runs, for C++ libraries whose logging
    ignores TF_CPP_MIN_LOG_LEVEL (TensorFlow's start-up lines, TFLite's delegate line). Python
    exceptions still surface; DOGTL_TF_VERBOSE=1 keeps everything."""
    if os.environ.get("DOGTL_TF_VERBOSE"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
