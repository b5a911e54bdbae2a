"""`dogtl bot`: a trained model as a Telegram chat bot (python-telegram-bot, long polling).

A photo, or an image sent as a file, is downloaded, decoded with `dogtl serve`'s decoder
(app.Predictor, so the pixels are `dogtl predict`'s) in a thread pool, and put on `dogtl serve`'s
micro-batcher (batching.MicroBatcher): photos from many chats share one model call, which waits
for the photos still downloading or decoding and for nothing else. Updates are handled
concurrently, so a slow download holds up only its own chat. Replies are written for a
dog owner (serving/bot_replies.py): readable class names, percentages, and "not sure" when the
best match is below `min_confidence` (a calibrated model's top class is then more likely wrong
than right).

The bot token is part of every Bot API URL, so `TokenRedactor` takes it out of log records.
python-telegram-bot, an optional extra, is imported where it is used (local), after
`require_bot_extra` has said how to install it if it is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from dogtl.core.errors import DogtlError, SettingError
from dogtl.core.precision import check_precision
from dogtl.core.runtimes import check_runtime
from dogtl.serving.app import BadUpload, Predictor
from dogtl.serving.batching import MicroBatcher
from dogtl.serving.bot_replies import (DOWNLOAD_FAILED, EMPTY, FAILED, HINT_OTHER, HINT_STICKER, HINT_TEXT, HINT_VIDEO,
                                       NOT_AN_IMAGE_FILE, TOO_BIG, TOO_BIG_UNKNOWN, TOO_MANY_PIXELS, UNREADABLE,
                                       describe, help_text, start_text)
from dogtl.serving.model import ServingModel

log = logging.getLogger(__name__)

DEFAULT_API_BASE = "https://api.telegram.org/bot"
MB = 1024 * 1024
MAX_CONCURRENT_UPDATES = 64  # messages handled at once (each holds at most one download in memory)
DOWNLOAD_TIMEOUT_S = 60
REQUEST_TIMEOUT_S = 20  # any other Bot API call
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".png", ".gif", ".bmp", ".webp")
_TOKEN_SHAPE = re.compile(r"\d{3,}(?::|%3A)[A-Za-z0-9_-]{20,}", re.IGNORECASE)  # %3A: in a quoted URL


def require_bot_extra():
    """Import python-telegram-bot, or say how to install it."""
    try:
        import telegram.ext  # noqa: F401
        import aiolimiter  # noqa: F401  (python-telegram-bot's rate limiter)
    except ImportError as e:
        raise DogtlError(f"dogtl bot needs the bot extra ({e.name or 'python-telegram-bot'} is missing): "
                         "pip install 'dogtl[bot]'") from None


# ---- settings -------------------------------------------------------------------------------

@dataclass(frozen=True)
class BotSettings:
    top: int = 3  # classes in a reply
    max_batch: int = 8  # most images per model call
    # The longest the first image of a batch waits for the photos being downloaded or decoded
    # (never when none are); an answer in a chat takes a round trip to Telegram anyway.
    batch_wait_ms: float = 25.0
    min_confidence: float = 0.5  # below this for the best class the reply says it is not sure
    max_file_mb: float = 20.0  # larger files are refused before downloading (the cloud API's own limit)
    runtime: str = "auto"  # what runs the model (core/runtimes.py), as in dogtl serve
    precision: str = "auto"

    def __post_init__(self):
        check_runtime(self.runtime)
        check_precision(self.precision)
        if self.top < 1:
            raise SettingError(f"--top {self.top} must be at least 1")
        if self.max_batch < 1:
            raise SettingError(f"--max-batch {self.max_batch} must be at least 1")
        if self.batch_wait_ms < 0:
            raise SettingError(f"--batch-wait-ms {self.batch_wait_ms} must be 0 or more")
        if not 0 <= self.min_confidence <= 1:
            raise SettingError(f"--min-confidence {self.min_confidence} must be between 0 and 1 (0.5 = 50%)")
        if self.max_file_mb <= 0:
            raise SettingError(f"--max-file-mb {self.max_file_mb} must be positive")


def check_token(token: str | None) -> str:
    """The token without surrounding whitespace, or a SettingError that never shows it."""
    token = (token or "").strip()
    if not token:
        raise SettingError("no bot token: pass --telegram-token TOKEN or set TELEGRAM_BOT_TOKEN "
                           "(@BotFather on Telegram gives you one with /newbot)")
    if not re.fullmatch(r"\d+:[A-Za-z0-9_-]+", token):
        raise SettingError("the bot token does not look like one (digits, a colon, then letters, digits, "
                           "'-' and '_'): copy it again from @BotFather")
    return token


def api_urls(api_base: str) -> tuple[str, str]:
    """(the Bot API URL, the file URL) from --api-base in the Bot API's own form: the token and
    the method follow it (https://api.telegram.org/bot -> .../bot<TOKEN>/getMe); files are under
    /file/bot on the same host. A bare host (http://127.0.0.1:8081) gets /bot added."""
    url = api_base.strip().rstrip("/")
    parts = urlsplit(url)
    shown = redact(api_base)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise SettingError(f"--api-base {shown!r}: give the Bot API's URL, e.g. {DEFAULT_API_BASE} or "
                           "http://127.0.0.1:8081/bot for a local telegram-bot-api server")
    if not parts.path:
        url += "/bot"
    elif not parts.path.endswith("/bot"):
        raise SettingError(f"--api-base {shown!r} must end in /bot, the token is not part of it "
                           f"(e.g. {DEFAULT_API_BASE} or http://127.0.0.1:8081/bot)")
    return url, url[: -len("/bot")] + "/file/bot"


# ---- keeping the token out of logs ----------------------------------------------------------

def redact(text: str, token: str | None = None) -> str:
    """`text` with the token, and anything shaped like a bot token, replaced by <token>."""
    if token:
        text = text.replace(token, "<token>").replace(quote(token, safe=""), "<token>")
    return _TOKEN_SHAPE.sub("<token>", text)


class TokenRedactor(logging.Filter):
    """A handler filter that takes the bot token out of every record passing through it (message,
    arguments and traceback): httpx logs request URLs, and python-telegram-bot its API URL and
    some errors, all of which contain the token."""

    def __init__(self, token: str):
        super().__init__()
        self.token = token

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message, self.token)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.token)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self.token)
        return True


# ---- the bot --------------------------------------------------------------------------------

class BreedBot:
    """The loaded model and its batcher, and the handlers that answer each kind of message."""

    def __init__(self, sm: ServingModel, settings: BotSettings = BotSettings()):
        require_bot_extra()
        self.sm, self.settings = sm, settings
        self.predictor = Predictor(sm, settings.top, settings.runtime, settings.precision)
        self.predictor.warm_up()
        self._coming = 0  # photos being downloaded or decoded
        self.batcher = MicroBatcher(self._predict, max_batch=settings.max_batch,
                                    max_wait_s=settings.batch_wait_ms / 1000, coming=lambda: self._coming)
        self.pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2), thread_name_prefix="dogtl-decode")
        self.max_bytes = int(settings.max_file_mb * MB)

    def _predict(self, inputs: tuple):
        rows = self.predictor.predict(inputs)
        log.debug("model call on %d images", len(rows))
        return rows

    def application(self, token: str, api_base: str = DEFAULT_API_BASE):
        """A python-telegram-bot Application polling the Bot API at `api_base`."""
        from telegram.ext import AIORateLimiter, Application, CommandHandler, MessageHandler, filters

        base_url, file_url = api_urls(api_base)
        # Flood control: when Telegram answers 429 the limiter waits the time it asks for and sends
        # again; in groups it keeps to Telegram's 20 messages a minute. No overall cap: PTB's
        # would count getFile calls too, and a reply is owed to every photo.
        limiter = AIORateLimiter(overall_max_rate=0, max_retries=3)
        # Timeouts well above python-telegram-bot's 5 s: on a busy machine a slow answer is better
        # than a "something went wrong" (downloads have their own, DOWNLOAD_TIMEOUT_S).
        app = (Application.builder().token(token).base_url(base_url).base_file_url(file_url)
               .connect_timeout(REQUEST_TIMEOUT_S).read_timeout(REQUEST_TIMEOUT_S)
               .write_timeout(REQUEST_TIMEOUT_S).pool_timeout(REQUEST_TIMEOUT_S)
               .concurrent_updates(MAX_CONCURRENT_UPDATES).rate_limiter(limiter)
               .post_init(self._started).post_stop(self._stopped).build())
        private = filters.ChatType.PRIVATE  # hints only in private chats: a group is not spammed
        app.add_handlers([
            CommandHandler("start", _reply_with(start_text(self.sm.classes))),
            CommandHandler("help", _reply_with(help_text(self.settings.max_file_mb, self.settings.min_confidence))),
            MessageHandler(filters.PHOTO, self.on_photo),
            # Before documents: Telegram sends a GIF as an animation and a document at once.
            MessageHandler((filters.VIDEO | filters.VIDEO_NOTE | filters.ANIMATION) & private,
                           _reply_with(HINT_VIDEO)),
            MessageHandler(filters.Document.ALL, self.on_document),
            MessageHandler(filters.Sticker.ALL & private, _reply_with(HINT_STICKER)),
            MessageHandler(filters.TEXT & private, _reply_with(HINT_TEXT)),  # unknown /commands too
            MessageHandler(private, _reply_with(HINT_OTHER)),
        ])
        app.add_error_handler(self.on_error)
        return app

    def run(self, token: str, api_base: str = DEFAULT_API_BASE) -> None:
        """Poll until SIGINT or SIGTERM; then finish the messages in hand, and return."""
        self.application(token, api_base).run_polling(allowed_updates=["message"],
                                                      stop_signals=(signal.SIGINT, signal.SIGTERM))

    async def _started(self, app) -> None:
        from telegram import BotCommand
        from telegram.error import TelegramError

        await self.batcher.start()
        try:  # the command menu Telegram apps show; the bot works without it
            await app.bot.set_my_commands([BotCommand("start", "What this bot does"),
                                           BotCommand("help", "What to send")])
        except TelegramError as e:
            log.warning("could not set the command menu: %s", e)
        log.info("@%s is answering with %s (%d classes); stop with Ctrl-C or SIGTERM", app.bot.username,
                 self.sm.name, len(self.sm.classes))

    async def _stopped(self, app) -> None:
        """After the messages in hand are answered."""
        await self.batcher.stop()
        self.pool.shutdown(wait=True)
        log.info("answered %d images in %d model calls", self.batcher.images, self.batcher.calls)

    async def on_photo(self, update, context) -> None:
        sizes = update.effective_message.photo
        # The smallest size the model does not have to enlarge: less to download and decode.
        big_enough = [p for p in sizes if min(p.width, p.height) >= self.sm.size]
        photo = (min(big_enough, key=lambda p: p.width * p.height) if big_enough
                 else max(sizes, key=lambda p: p.width * p.height))
        await self._classify(update.effective_message, photo.file_id, photo.file_size)

    async def on_document(self, update, context) -> None:
        message = update.effective_message
        document = message.document
        name = document.file_name or "no name"
        if not ((document.mime_type or "").startswith("image/") or name.lower().endswith(IMAGE_SUFFIXES)):
            if message.chat.type == "private":
                await message.reply_text(NOT_AN_IMAGE_FILE.format(name=name), do_quote=True)
            return
        await self._classify(message, document.file_id, document.file_size)

    async def _classify(self, message, file_id: str, declared_size: int | None) -> None:
        started = time.perf_counter()
        self._coming += 1  # the batcher waits for photos on their way, and only for those
        try:
            inputs = await self._read_image(message.get_bot(), message.chat_id, file_id, declared_size)
        finally:
            self._coming -= 1
        if isinstance(inputs, str):  # why it cannot be answered
            return await message.reply_text(inputs, do_quote=True)
        row = await self.batcher.submit(inputs)
        top = [(p["class"], p["probability"]) for p in self.predictor.top(row)]
        await message.reply_text(describe(top, self.settings.min_confidence), do_quote=True)
        log.info("chat %s: %s (%.0f%%) in %.2f s", message.chat_id, top[0][0], top[0][1] * 100,
                 time.perf_counter() - started)

    async def _read_image(self, bot, chat_id: int, file_id: str, declared_size: int | None) -> tuple | str:
        """The model's inputs for the file, or the reply saying why there are none."""
        from telegram.error import BadRequest, TelegramError

        if declared_size and declared_size > self.max_bytes:
            return self._too_big(declared_size)
        try:
            file = await bot.get_file(file_id)
            if file.file_size and file.file_size > self.max_bytes:
                return self._too_big(file.file_size)
            data = await file.download_as_bytearray(read_timeout=DOWNLOAD_TIMEOUT_S)
        except BadRequest as e:
            if "too big" in str(e).lower():
                return self._too_big(None)
            log.warning("chat %s: could not get the file: %s", chat_id, e)
            return DOWNLOAD_FAILED
        except TelegramError as e:  # network errors and timeouts included
            log.warning("chat %s: could not download the file: %s", chat_id, e)
            return DOWNLOAD_FAILED
        if len(data) > self.max_bytes:
            return self._too_big(len(data))
        if not data:
            return EMPTY
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, self.predictor.decode, bytes(data))
        except BadUpload as e:  # serve's 413: a decompression bomb, refused from its header
            log.info("chat %s: unreadable image: %s", chat_id, e.message)
            return TOO_MANY_PIXELS if e.status == 413 else UNREADABLE.format(
                reason=re.sub(r"^cannot read the image \((.*)\)$", r"\1", e.message))

    def _too_big(self, size: int | None) -> str:
        limit = self.settings.max_file_mb
        return TOO_BIG.format(size=f"{size / MB:.1f}", limit=limit) if size else TOO_BIG_UNKNOWN.format(limit=limit)

    async def on_error(self, update, context) -> None:
        """A handler failed (a bug, or Telegram unreachable while replying): log it, tell the
        user if possible, and go on with the other messages."""
        from telegram import Update
        from telegram.error import TelegramError

        log.error("handling a message failed: %s", context.error, exc_info=context.error)
        if isinstance(update, Update) and update.effective_message:
            with contextlib.suppress(TelegramError):
                await update.effective_message.reply_text(FAILED, do_quote=True)


def _reply_with(text: str):
    """A handler that answers with `text`."""
    async def reply(update, context):
        await update.effective_message.reply_text(text, do_quote=True)
    return reply


def check_connection(token: str, api_base: str = DEFAULT_API_BASE) -> str:
    """The bot's username from getMe, or a DogtlError (never showing the token) for a rejected
    token or a Bot API server that cannot be reached."""
    require_bot_extra()
    from telegram import Bot
    from telegram.error import InvalidToken, NetworkError, TelegramError

    base_url, file_url = api_urls(api_base)
    shown = redact(api_base, token)

    async def get_me():
        async with Bot(token, base_url=base_url, base_file_url=file_url) as bot:
            return bot.username

    try:
        return asyncio.run(get_me())
    except InvalidToken:
        raise DogtlError(f"the Bot API at {shown} rejected the bot token: check --telegram-token or "
                         "TELEGRAM_BOT_TOKEN (copy it again from @BotFather), or that --api-base is a Bot API "
                         "server") from None
    except NetworkError as e:  # timeouts too
        raise DogtlError(f"cannot reach the Bot API at {shown} ({redact(str(e), token)}): check --api-base "
                         "and the network") from None
    except TelegramError as e:
        raise DogtlError(f"the Bot API at {shown} refused getMe: {redact(str(e), token)}") from None
