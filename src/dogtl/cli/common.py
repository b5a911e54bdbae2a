"""What every command shares: quiet TensorFlow start-up, one-line errors, progress bars (which
draw the stages' ProgressEvents, core/progress.py)."""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import logging
import os
import platform
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import typer

from dogtl.core.budget import process_start
from dogtl.core.errors import DogtlError, SettingError, os_error_message
from dogtl.core.progress import PlainProgress, ProgressEvent
from dogtl.core.quiet import native_stderr_silenced
from dogtl.core.settings import read_settings_file
from dogtl.core.version import __version__

_PROCESS_STARTED: float | None = None  # set by `main`, the `dogtl` program's entry point
_COMMAND_STARTED: float | None = None


def mark_process_start() -> None:
    """Called first thing by the `dogtl` program: budgets then count Python's own start-up too."""
    global _PROCESS_STARTED
    _PROCESS_STARTED = process_start()


def command_started() -> float:
    """When the user started this command (time.time()): the process's start when run as the `dogtl`
    program, else (a notebook, a test) when the command function was called."""
    return _PROCESS_STARTED or _COMMAND_STARTED or time.time()


def _quiet_tensorflow():
    """Quiet TensorFlow's start-up whenever a command first imports it, not before: the options,
    the data folder and the files are checked first, so a mistake costs no TensorFlow start-up."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Imports TensorFlow, the first time anything does, with its C++ start-up lines (oneDNN, CUDA
    probing) kept off stderr (core/quiet.py); its devices are listed then too, as probing them
    prints more. Python errors still surface."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once; find_spec below asks the other finders
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _SilencedLoader(spec.loader)
        return spec


class _SilencedLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        with native_stderr_silenced():
            module.__loader__ = module.__spec__.loader = self.loader  # the real one, once loaded
            self.loader.exec_module(module)
            module.config.list_physical_devices()


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
        global _COMMAND_STARTED
        _COMMAND_STARTED = time.time()
        received.clear()
        previous = _interrupt_on_signals()  # first: a signal while TensorFlow loads is handled too
        _ignore_failed_h5_closes()
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


def _ignore_failed_h5_closes() -> None:
    """When a write fails (a full disk), h5py objects of the unwritable file complain again as
    they are freed, through sys.unraisablehook ("Exception ignored in ... __dealloc__", a
    traceback), while the error unwinds or at exit: that says nothing the write's own error (one
    line) does not, so it is not shown."""
    shown = sys.unraisablehook
    if getattr(shown, "dogtl", False):
        return

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and "file write failed" in str(unraisable.exc_value)):
            shown(unraisable)

    hook.dogtl = True
    sys.unraisablehook = hook


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
    versions = [f"dogtl {__version__}"]
    for name in ("tensorflow", "keras", "h5py", "numpy"):
        module = sys.modules.get(name)
        versions.append(f"{name} {getattr(module, '__version__', 'not loaded')}")
    return ("".join(traceback.format_exception(error)) +
            f"versions: {', '.join(versions)}, python {platform.python_version()}\n"
            "this is a bug in dogtl, not a problem with your input: please report it with the "
            "traceback and versions above\n")


def _bug(error: BaseException):
    typer.secho(bug_report(error), err=True, nl=False)
    raise typer.Exit(1)


def interactive() -> bool:
    """Whether a progress bar can be seen: a terminal on stderr, or a Jupyter notebook."""
    from rich.console import Console

    return sys.stderr.isatty() or Console().is_jupyter


class _RichBar:
    """Context-manager plumbing shared by the progress bars below (they set self.progress), and
    `echo`, a line above the bar (or plain, when there is no bar)."""

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def echo(self, line: str):
        if self.progress.disable:
            typer.echo(line)
        else:
            self.progress.console.print(line, markup=False, highlight=False, soft_wrap=True)


class ImageProgress(_RichBar):
    """Progress over images, fed by a stage's ProgressEvents (called with them) or by (done, total)
    (`update`): a rich bar with images/s and ETA in a terminal or notebook, else PlainProgress
    lines; an event's line (a finished epoch, a message) is printed above the bar."""

    def __init__(self, description: str):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} img/s"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), transient=False, disable=not interactive(),
        )
        self.plain = PlainProgress(description) if self.progress.disable else None
        self.description = description
        self.task = None

    def __call__(self, event: ProgressEvent):
        line = event.line()
        if line is not None:
            self.echo(line)
        elif event.unit == "images":
            self.update(event.done, event.total)

    def update(self, done: int, total: int):
        if self.plain is not None:
            return self.plain.update(done, total)
        if self.task is None:
            self.task = self.progress.add_task(self.description, total=total, rate="  -", completed=done)
            return
        self.progress.update(self.task, completed=done, total=total)
        speed = self.progress.tasks[0].speed
        self.progress.update(self.task, rate=f"{speed:5.1f}" if speed else "  -")


TRACK_OPTION = typer.Option(False, "--track", help=(
    "Record the run in MLflow: settings, per-epoch metrics, the result, plots and the model file "
    "(pip install 'dogtl[track]'). Goes to MLFLOW_TRACKING_URI (a tracking server), else MLflow's local "
    "default in this folder (mlflow.db, mlruns/: see it with `mlflow ui`); experiment MLFLOW_EXPERIMENT_NAME or dogtl."))


def show_tracking(track: bool) -> None:
    """With --track, the line naming the MLflow run and where it went is shown."""
    if track:
        logging.getLogger("dogtl.core.tracking").setLevel(logging.INFO)


# Every command that uses a trained model takes it the same way: first on the command line
# (dogtl evaluate models/head.keras), with --model as the same thing spelled as an option.
MODEL_DEFAULT = "default: models/finetuned.keras, else models/head.keras"


def model_argument(help: str):
    return typer.Argument(None, metavar="MODEL", show_default=False, help=f"{help} ({MODEL_DEFAULT}).")


def model_option(name: str = "--model"):
    return typer.Option(None, name, show_default=False, help="The same as MODEL, spelled as an option.")


def chosen_model(argument, option, option_name: str = "--model") -> Path:
    """The model of a command: the argument or its option (not two different ones), else the
    default (models/finetuned.keras, else models/head.keras)."""
    from dogtl.evaluation.predict import resolve_model  # local: evaluation.predict loads pandas

    if argument is not None and option is not None and Path(argument) != Path(option):
        raise SettingError(f"two models given, {argument} and {option_name} {option}: pass one")
    return resolve_model(argument if argument is not None else option)


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
    for key, value in read_settings_file(path, settings, section, extra=tuple(io)).items():
        source = ctx.get_parameter_source(key)
        if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):  # the command line wins
            (io if key in io else values)[key] = value
    return values, io
