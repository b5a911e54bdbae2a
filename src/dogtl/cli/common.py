"""What every command shares: quiet TensorFlow start-up, one-line errors, progress bars."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
import time

import typer

_PROCESS_STARTED: float | None = None  # set by `main`, the `dogtl` program's entry point
_COMMAND_STARTED: float | None = None


def mark_process_start() -> None:
    """Called first thing by the `dogtl` program: budgets then count Python's own start-up too."""
    from dogtl.core.budget import process_start

    global _PROCESS_STARTED
    _PROCESS_STARTED = process_start()


def command_started() -> float:
    """When the user started this command (time.time()): the process's start when run as the `dogtl`
    program, else (a notebook, a test) when the command function was called."""
    return _PROCESS_STARTED or _COMMAND_STARTED or time.time()


def _quiet_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    # TensorFlow's C++ start-up lines (oneDNN, CUDA probing) ignore TF_CPP_MIN_LOG_LEVEL:
    # silence stderr while it loads and looks for devices; Python errors still surface.
    if "tensorflow" not in sys.modules and not os.environ.get("DOGTL_TF_VERBOSE"):
        saved = os.dup(2)
        try:
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), 2)
                import tensorflow as tf

                tf.config.list_physical_devices()
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def fail(message: str, code: int = 2):
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def friendly_errors(command):
    """dogtl's own errors and the operating-system errors a user can fix (disk full, permission
    denied, read-only, a folder for a file) become one line on stderr and a non-zero exit; Ctrl-C
    and SIGTERM keep finished work (exit 130/143). Anything else is a bug in dogtl: its traceback,
    the versions and a request to report it, exit 1."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from dogtl.core.errors import DogtlError, os_error_message

        global _COMMAND_STARTED
        _COMMAND_STARTED = time.time()
        received.clear()
        previous = _interrupt_on_signals()  # first: a signal while TensorFlow loads is handled too
        try:
            _quiet_tensorflow()
            return command(*args, **kwargs)
        except DogtlError as e:
            fail(str(e))
        except OSError as e:
            message = os_error_message(e)
            if message is None:
                _bug_unless_signalled(e)
            fail(message, code=1)
        except KeyboardInterrupt:
            _interrupted()
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001  a bug: shown as one, never as a user error
            _bug_unless_signalled(e)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    return wrapper


received: list[int] = []  # the signals (SIGINT, SIGTERM) this command got


def _interrupted():
    """Ctrl-C (exit 130) or SIGTERM (exit 143): finished work is kept."""
    what, code = ("terminated", 143) if signal.SIGTERM in received else ("interrupted", 130)
    typer.secho(f"{what}: finished work is kept; rerun the same command to resume", err=True,
                fg=typer.colors.YELLOW)
    raise typer.Exit(code)


def _bug_unless_signalled(error: BaseException):
    """An exception after a signal is the signal's doing, not a bug: the KeyboardInterrupt it raised
    inside TensorFlow can surface as another error (a SystemError from its C code, say)."""
    if received:
        _interrupted()
    _bug(error)


def _in_finalizer(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _interrupt_on_signals() -> dict:
    """SIGINT and SIGTERM raise KeyboardInterrupt where the process is, so the same cleanup runs for
    both (locks released); returns the handlers they replace. In a finalizer (`__del__`, which
    TensorFlow runs often) Python would print and drop the exception, so the signal is sent again
    a moment later instead."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        received.append(signum)
        if _in_finalizer(frame):
            again = threading.Timer(0.1, os.kill, (os.getpid(), signum))
            again.daemon = True  # never holds up the exit
            again.start()
            return
        raise KeyboardInterrupt
    return {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}


def bug_report(error: BaseException) -> str:
    """The traceback, the versions and the request to report it, as printed for a bug."""
    import platform
    import traceback

    versions = []
    for name in ("dogtl", "tensorflow", "keras", "h5py", "numpy"):
        module = sys.modules.get(name)
        versions.append(f"{name} {getattr(module, '__version__', 'not loaded')}")
    return ("".join(traceback.format_exception(error)) +
            f"versions: {', '.join(versions)}, python {platform.python_version()}\n"
            "this is a bug in dogtl, not a problem with your input: please report it with the "
            "traceback and versions above\n")


def _bug(error: BaseException):
    import dogtl  # noqa: F401  its version in the report

    typer.secho(bug_report(error), err=True, nl=False)
    raise typer.Exit(1)


def interactive() -> bool:
    """Whether a progress bar can be seen: a terminal on stderr, or a Jupyter notebook."""
    from rich.console import Console

    return sys.stderr.isatty() or Console().is_jupyter


class _RichBar:
    """Context-manager plumbing shared by the progress bars below (they set self.progress)."""

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)


class ImageProgress(_RichBar):
    """A rich progress bar with images/s and ETA, fed by (done, total) callbacks."""

    def __init__(self, description: str):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} img/s"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), transient=False, disable=not interactive(),
        )
        self.description = description
        self.task = None


    def update(self, done: int, total: int):
        if self.task is None:
            self.task = self.progress.add_task(self.description, total=total, rate="  -", completed=done)
            self._start = done
            return
        self.progress.update(self.task, completed=done, total=total)
        speed = self.progress.tasks[0].speed
        self.progress.update(self.task, rate=f"{speed:5.1f}" if speed else "  -")




class EpochProgress(_RichBar):
    """A rich progress bar over epochs with the validation log loss, fed by train-head's per-epoch
    dicts (a notebook's view of `dogtl.train_head`)."""

    def __init__(self, description: str, epochs: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("val log loss {task.fields[val_loss]}"), TimeElapsedColumn(),
                                 disable=not interactive())
        self.task = self.progress.add_task(description, total=epochs, val_loss="-")

    def update(self, row: dict):
        self.progress.update(self.task, completed=row["epoch"], val_loss=f"{row['val_loss']:.4f}")


CONFIG_OPTION = typer.Option(None, "--config", help=(
    "TOML or JSON file of this command's settings, keys = option names with underscores (e.g. max_lr = 0.002); "
    "options given on the command line win over the file."))


def apply_config_file(ctx: typer.Context, values: dict, path, settings, section: str,
                      io: dict | None = None) -> tuple[dict, dict]:
    """(settings, io): the command's setting values and its file options `io` (cache, out...),
    with the settings file's value in place of every option the command line did not give."""
    values, io = dict(values), dict(io or {})
    if path is None:
        return values, io
    from dogtl.core.settings import read_settings_file

    for key, value in read_settings_file(path, settings, section, extra=tuple(io)).items():
        source = ctx.get_parameter_source(key)
        if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):  # the command line wins
            (io if key in io else values)[key] = value
    return values, io
