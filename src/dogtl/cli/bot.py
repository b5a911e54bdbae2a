"""dogtl bot: the model as a Telegram chat bot."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Optional

import typer

from dogtl.cli.common import chosen_model, friendly_errors, model_argument, model_option
from dogtl.core.errors import SettingError
from dogtl.core.precision import PRECISION_HELP
from dogtl.core.runtimes import RUNTIME_HELP

LOG_LEVELS = ("debug", "info", "warning", "error")


@friendly_errors
def bot_cmd(
    model: Optional[Path] = model_argument("Any model dogtl serve serves: a fine-tuned or head model (.keras, with its .json beside it), or an ONNX / OpenVINO export"),
    model_opt: Optional[Path] = model_option(),
    telegram_token: Optional[str] = typer.Option(None, "--telegram-token", envvar="TELEGRAM_BOT_TOKEN", show_envvar=True, help="The bot's token from @BotFather. Prefer the environment variable on shared machines: a command line is visible to every user (ps)."),
    api_base: str = typer.Option("https://api.telegram.org/bot", "--api-base", help="The Bot API server, in the Bot API's own form (the token follows it): http://127.0.0.1:8081/bot for a self-hosted telegram-bot-api. Files are fetched from /file/bot on the same host."),
    top: int = typer.Option(3, help="Classes named in each reply (alternatives under 1% are left out)."),
    min_confidence: float = typer.Option(0.5, help="Below this probability for the best class the reply says it is not sure instead of naming one breed (0.5: the best guess is more likely wrong than right)."),
    max_batch: int = typer.Option(8, help="Most images per model call: photos arriving together, from any chats, are batched."),
    batch_wait_ms: float = typer.Option(25.0, help="The longest the first photo of a batch waits for the photos still being downloaded or decoded (ms); a lone photo never waits."),
    max_file_mb: float = typer.Option(20.0, help="Larger files get a reply saying so and are not downloaded (20 MB is the cloud Bot API's own download limit)."),
    weights: Optional[str] = typer.Option(None, help="Only for a head whose backbone came from a local weights file that moved: that file."),
    runtime: str = typer.Option("auto", help=RUNTIME_HELP + " As in dogtl serve."),
    precision: str = typer.Option("auto", help=PRECISION_HELP),
    log_level: str = typer.Option("info", help=f"Logging: {', '.join(LOG_LEVELS)}. The token is taken out of every line."),
):
    """Answer photos sent to a Telegram bot with the model's top classes (needs: pip install 'dogtl\\[bot]').

    A photo, or an image sent as a file, gets a reply such as "Most likely a beagle (91%); maybe a basset hound (6%)", or says it is not sure when the best class is under --min-confidence. /start and /help explain what to send; other messages get a short hint. Photos from many chats are batched into one model call, and each chat's download runs on its own. Ctrl-C or SIGTERM stops after the photos in hand are answered; messages sent while the bot is stopped wait at Telegram and are answered when it starts again.

    Example: TELEGRAM_BOT_TOKEN=123456:ABC... dogtl bot models/finetuned.keras
    """
    # local: the bot's stack (asyncio, httpx, the model) loads only for this command, not for `dogtl --help`
    from dogtl.serving.bot import BotSettings, BreedBot, api_urls, check_connection, check_token, require_bot_extra
    from dogtl.serving.model import load_serving_model

    require_bot_extra()
    if log_level not in LOG_LEVELS:
        raise SettingError(f"--log-level {log_level!r}: choose one of {', '.join(LOG_LEVELS)}")
    token = check_token(telegram_token)
    api_urls(api_base)  # a malformed --api-base fails before anything is loaded
    settings = BotSettings(top=top, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                           min_confidence=min_confidence, max_file_mb=max_file_mb, runtime=runtime,
                           precision=precision)
    with _logging_without(token, log_level):
        username = check_connection(token, api_base)  # a bad token fails before the model loads
        sm = load_serving_model(chosen_model(model, model_opt), weights)
        bot = BreedBot(sm, settings)
        typer.echo(f"@{username} answers with {sm.name} ({len(sm.classes)} classes, {bot.predictor.runtime}); "
                   "Ctrl-C to stop")
        bot.run(token, api_base)
    typer.echo("stopped")


@contextlib.contextmanager
def _logging_without(token: str, level: str):
    """Log lines with a time, at `level`, with the token taken out of every one; as before on exit.
    httpx logs each request's URL (which holds the token) at INFO: quiet unless --log-level debug."""
    from dogtl.serving.bot import TokenRedactor  # local: see bot_cmd

    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig()
    redactor, formatter = TokenRedactor(token), logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    loggers = [root] + [logging.getLogger(name) for name in ("httpx", "httpcore")]
    saved = [(h, h.formatter) for h in root.handlers], [(lg, lg.level) for lg in loggers]
    for handler in root.handlers:
        handler.addFilter(redactor)
        handler.setFormatter(formatter)
    root.setLevel(level.upper())
    for lg in loggers[1:]:
        lg.setLevel("DEBUG" if level == "debug" else "WARNING")
    try:
        yield
    finally:
        for handler, previous in saved[0]:
            handler.removeFilter(redactor)
            handler.setFormatter(previous)
        for lg, previous in saved[1]:
            lg.setLevel(previous)
