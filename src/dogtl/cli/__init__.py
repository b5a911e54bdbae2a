"""The `dogtl` command line: parses options, shows progress, prints, picks exit codes.

Everything heavy is imported inside the commands so `dogtl --help` stays instant.
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

import typer

from dogtl.core.version import __version__
from dogtl.cli import bot, demo, ensemble, evaluation, features, finetune, fit, head, serving, sweep
from dogtl.cli.common import mark_process_start

app = typer.Typer(
    help="Transfer learning in three stages: extract-features (frozen backbone, once) -> "
         "train-head (seconds per epoch on cached features) -> finetune.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    pretty_exceptions_enable=False,
)


def versions_line() -> str:
    """dogtl's version and those of the libraries it runs on, read without importing them."""
    parts = [f"dogtl {__version__}"]
    for name in ("tensorflow", "keras"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} not installed")
    return ", ".join(parts) + f", python {platform.python_version()}"


def _show_version(value: bool):
    if value:
        typer.echo(versions_line())
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                       help="Print the versions of dogtl, TensorFlow, Keras and Python, and exit.")):
    """Transfer learning in three stages, with a feature cache between them."""


def _register() -> None:
    """Commands in the order data flows through them, which is the order `dogtl --help` lists."""
    for name, command in [
        ("fit", fit.fit_cmd),
        ("extract-features", features.extract_features_cmd), ("merge-cache", features.merge_cache_cmd),
        ("lr-find", head.lr_find_cmd), ("train-head", head.train_head_cmd), ("sweep", sweep.sweep_cmd),
        ("ensemble", ensemble.ensemble_cmd),
        ("finetune", finetune.finetune_cmd), ("evaluate", evaluation.evaluate_cmd),
        ("predict", evaluation.predict_cmd), ("export", serving.export_cmd), ("serve", serving.serve_cmd),
        ("bot", bot.bot_cmd),
        ("demo", demo.demo_cmd),
    ]:
        app.command(name)(command)


_register()


def main():
    mark_process_start()
    app()


if __name__ == "__main__":
    main()
