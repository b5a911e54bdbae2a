"""What every command shares: quiet TensorFlow start-up, one-line errors, progress bars."""

from __future__ import annotations

import functools
import logging
import os
import sys

import typer


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
    """Known problems become one line on stderr and exit code 2; Ctrl-C keeps work."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        _quiet_tensorflow()
        try:
            return command(*args, **kwargs)
        except (ValueError, FileNotFoundError, FileExistsError) as e:
            fail(str(e))
        except KeyboardInterrupt:
            typer.secho("interrupted: finished work is kept; rerun the same command to resume",
                        err=True, fg=typer.colors.YELLOW)
            raise typer.Exit(130)
    return wrapper


def apply_config_file(ctx: typer.Context, values: dict, path, section: str, known: set[str]) -> dict:
    """`values` (a command's options by name) with the settings of a --config FILE laid over
    those the command line left at their defaults: the command line wins over the file.

    The file is a TOML or JSON table whose keys are option names with underscores (hyphens
    are accepted too), optionally all under one [`section`] table; a key not in `known` is
    refused with one line. No file (`path` None): `values` unchanged.
    """
    if path is None:
        return values
    from dogtl.core.errors import DogtlError
    from dogtl.core.settingsfile import read_table

    table = read_table(path, f"--config {path}", "a table of settings")
    for name in {section, section.replace("_", "-")}:
        if isinstance(table.get(name), dict) and len(table) == 1:
            table = table[name]
    table = {str(k).replace("-", "_"): v for k, v in table.items()}
    unknown = sorted(set(table) - known)
    if unknown:
        raise DogtlError(f"--config {path}: unknown setting(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(known))}")
    merged = dict(values)
    for key, value in table.items():
        source = ctx.get_parameter_source(key)
        if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
            merged[key] = value
    return merged



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
            TimeRemainingColumn(), transient=False, disable=not sys.stderr.isatty(),
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


