"""A fake Telegram Bot API server on loopback, for the bot's tests and benchmarks/bench_bot.py.

It answers the methods a polling python-telegram-bot bot calls (getMe, deleteWebhook,
setMyCommands, getUpdates with long polling, getFile, the file download under /file/bot, and
sendMessage) for one token, in the Bot API's own URL form: `{url}{token}/{method}`, files at
`http://host:port/file/bot{token}/{file_path}`. Anything else gets the API's 404, a wrong token
its 401. The caller plays the users: it queues messages (photos, documents, text, stickers,
videos, ...) as updates, and reads what the bot sent back with `wait_replies`.

Nothing here knows dogtl; it is plain standard library so the benchmark can use it too.
"""

from __future__ import annotations

import io
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, unquote, urlsplit

TOKEN = "123456789:AAE-fake_token-for-Tests_0123456789"
BOT_USER = {"id": 123456789, "is_bot": True, "first_name": "Dog breeds", "username": "dogtl_test_bot",
            "can_join_groups": True, "can_read_all_group_messages": False, "supports_inline_queries": False}
STRING_PARAMS = {"text", "file_id", "parse_mode"}  # never JSON-decoded


@dataclass
class Reply:
    chat_id: int
    text: str
    reply_to: int | None  # the message it quotes
    at: float  # time.monotonic() when the bot sent it


@dataclass
class _File:
    path: str
    data: bytes
    size: int  # the size Telegram reports (may differ from len(data), to test limits cheaply)
    declared: bool = True  # getFile reports the size
    delay_s: float = 0.0  # the download waits this long before the first byte


@dataclass
class _State:
    cond: threading.Condition = field(default_factory=threading.Condition)
    updates: list = field(default_factory=list)
    replies: list = field(default_factory=list)
    calls: list = field(default_factory=list)  # (method, params) in arrival order
    files: dict = field(default_factory=dict)
    sent_at: dict = field(default_factory=dict)  # message_id -> time.monotonic() when queued
    floods: dict = field(default_factory=dict)  # chat_id -> retry_after for its next sendMessage
    next_update: int = 1
    next_message: int = 1
    next_file: int = 1
    stopping: bool = False


class FakeTelegram:
    """`with FakeTelegram() as tg:` serves on 127.0.0.1 at a free port; `tg.api_base` is the
    URL to give the bot (`http://127.0.0.1:PORT/bot`)."""

    def __init__(self, token: str = TOKEN):
        self.token = token
        self.state = _State()
        self._server = _Server(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="fake-telegram")

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/bot"

    def start(self) -> FakeTelegram:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self.state.cond:
            self.state.stopping = True
            self.state.cond.notify_all()  # long polls return at once
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---- the users' side ------------------------------------------------------------------

    def add_file(self, data: bytes, *, name: str = "file", size: int | None = None, declared: bool = True,
                 delay_s: float = 0.0) -> str:
        """A file the bot can getFile and download; its file_id."""
        with self.state.cond:
            n = self.state.next_file
            self.state.next_file += 1
        file_id = f"file-{n}"
        self.state.files[file_id] = _File(f"files/{n}/{name}", bytes(data), len(data) if size is None else size,
                                          declared, delay_s)
        return file_id

    def send(self, chat_id: int, **content) -> int:
        """Queue a message from a user in chat `chat_id` (negative: a group) with the given Bot
        API Message fields (photo=..., text=..., sticker=...); its message_id."""
        with self.state.cond:
            message_id = self.state.next_message
            self.state.next_message += 1
            chat = ({"id": chat_id, "type": "private", "first_name": "Owner"} if chat_id > 0
                    else {"id": chat_id, "type": "group", "title": "Dog people"})
            user = {"id": abs(chat_id), "is_bot": False, "first_name": "Owner"}
            message = {"message_id": message_id, "date": int(time.time()), "chat": chat, "from": user, **content}
            self.state.updates.append({"update_id": self.state.next_update, "message": message})
            self.state.next_update += 1
            self.state.sent_at[message_id] = time.monotonic()
            self.state.cond.notify_all()
        return message_id

    def send_photo(self, chat_id: int, *sizes: bytes | tuple[bytes, int, int], delay_s: float = 0.0) -> int:
        """A photo in one or more sizes (encoded images, or (data, width, height)), smallest first
        as Telegram lists them."""
        photo = []
        for k, size in enumerate(sizes):
            data, width, height = size if isinstance(size, tuple) else (size, *_image_size(size))
            file_id = self.add_file(data, name=f"photo{k}.jpg", delay_s=delay_s)
            photo.append({"file_id": file_id, "file_unique_id": f"u{file_id}", "width": width, "height": height,
                          "file_size": len(data)})
        return self.send(chat_id, photo=photo)

    def send_document(self, chat_id: int, data: bytes, file_name: str, mime_type: str | None,
                      *, size: int | None = None, declare_size: bool = True, delay_s: float = 0.0) -> int:
        """A file sent as a document; `size` is the size Telegram reports (default: the data's),
        left out of the message when `declare_size` is false."""
        file_id = self.add_file(data, name=file_name, size=size, declared=declare_size, delay_s=delay_s)
        document = {"file_id": file_id, "file_unique_id": f"u{file_id}", "file_name": file_name}
        if declare_size:
            document["file_size"] = len(data) if size is None else size
        if mime_type:
            document["mime_type"] = mime_type
        return self.send(chat_id, document=document)

    def send_text(self, chat_id: int, text: str) -> int:
        """Text; a leading /command gets its bot_command entity, as Telegram adds it."""
        if text.startswith("/"):
            length = len(text.split()[0])
            return self.send(chat_id, text=text, entities=[{"type": "bot_command", "offset": 0, "length": length}])
        return self.send(chat_id, text=text)

    def media(self, kind: str) -> dict:
        """Message fields for a sticker, video, animation, voice or location message."""
        file_id = self.add_file(b"\x00" * 64, name=kind)
        base = {"file_id": file_id, "file_unique_id": f"u{file_id}"}
        return {
            "sticker": {"sticker": {**base, "type": "regular", "width": 512, "height": 512, "is_animated": False,
                                    "is_video": False, "emoji": "\U0001F436"}},
            "video": {"video": {**base, "width": 640, "height": 360, "duration": 3}},
            # Telegram sends a GIF as both an animation and a document.
            "animation": {"animation": {**base, "width": 320, "height": 240, "duration": 2},
                          "document": {**base, "file_name": "dog.gif.mp4", "mime_type": "video/mp4"}},
            "voice": {"voice": {**base, "duration": 2}},
            "location": {"location": {"latitude": 52.37, "longitude": 4.89}},
        }[kind]

    def flood(self, chat_id: int, retry_after: int = 1) -> None:
        """The next sendMessage to `chat_id` gets Telegram's 429 flood-control answer."""
        with self.state.cond:
            self.state.floods[chat_id] = retry_after

    def replies(self, chat_id: int | None = None) -> list[Reply]:
        with self.state.cond:
            return [r for r in self.state.replies if chat_id is None or r.chat_id == chat_id]

    def wait_replies(self, chat_id: int, count: int = 1, timeout: float = 60) -> list[Reply]:
        """The first `count` replies in a chat, waiting for them; AssertionError after `timeout` s."""
        deadline = time.monotonic() + timeout
        with self.state.cond:
            while True:
                mine = [r for r in self.state.replies if r.chat_id == chat_id]
                if len(mine) >= count:
                    return mine[:count]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"chat {chat_id}: {len(mine)} of {count} replies after {timeout} s: "
                                         f"{[r.text for r in mine]}")
                self.state.cond.wait(left)

    def sent_at(self, message_id: int) -> float:
        return self.state.sent_at[message_id]

    def calls(self, method: str | None = None) -> list[dict]:
        with self.state.cond:
            return [p for m, p in self.state.calls if method is None or m == method]

    # ---- the Bot API's side ---------------------------------------------------------------

    def _call(self, method: str, params: dict):
        """(HTTP status, Bot API response) for one method call."""
        s = self.state
        with s.cond:
            s.calls.append((method, params))
        if method == "getMe":
            return 200, _ok(BOT_USER)
        if method in ("deleteWebhook", "setMyCommands"):
            return 200, _ok(True)
        if method == "getUpdates":
            return 200, _ok(self._get_updates(int(params.get("offset", 0)), float(params.get("timeout", 0)),
                                              int(params.get("limit", 100))))
        if method == "getFile":
            f = s.files.get(str(params.get("file_id")))
            if f is None:
                return 400, _error(400, "Bad Request: invalid file_id")
            if f.size > 20 * 1024 * 1024:  # the cloud Bot API's download limit
                return 400, _error(400, "Bad Request: file is too big")
            answer = {"file_id": params["file_id"], "file_unique_id": f"u{params['file_id']}", "file_path": f.path}
            return 200, _ok({**answer, "file_size": f.size} if f.declared else answer)
        if method == "sendMessage":
            chat_id, text = int(params["chat_id"]), str(params["text"])
            reply_to = (params.get("reply_parameters") or {}).get("message_id") or params.get("reply_to_message_id")
            with s.cond:
                retry_after = s.floods.pop(chat_id, None)
                if retry_after is not None:
                    return 429, {**_error(429, f"Too Many Requests: retry after {retry_after}"),
                                 "parameters": {"retry_after": retry_after}}
                message_id = s.next_message
                s.next_message += 1
                s.replies.append(Reply(chat_id, text, reply_to, time.monotonic()))
                s.cond.notify_all()
            chat = {"id": chat_id, "type": "private" if chat_id > 0 else "group"}
            return 200, _ok({"message_id": message_id, "date": int(time.time()), "chat": chat, "from": BOT_USER,
                             "text": text})
        return 404, _error(404, "Not Found: method not found")

    def _get_updates(self, offset: int, timeout: float, limit: int) -> list:
        s = self.state
        deadline = time.monotonic() + timeout
        with s.cond:
            if offset:  # confirms (drops) every update before `offset`
                s.updates = [u for u in s.updates if u["update_id"] >= offset]
            while not s.updates and not s.stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                s.cond.wait(left)
            return s.updates[:limit]

    def _file(self, path: str):
        f = next((f for f in self.state.files.values() if f.path == path), None)
        if f is None:
            return None
        if f.delay_s:
            time.sleep(f.delay_s)
        return f.data


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a cancelled long poll is no error
            super().handle_error(request, client_address)


def _ok(result) -> dict:
    return {"ok": True, "result": result}


def _error(code: int, description: str) -> dict:
    return {"ok": False, "error_code": code, "description": description}


def _image_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.size


def _params(query: str, body: bytes, content_type: str) -> dict:
    """The method's parameters: the query string and a url-encoded or JSON body. As the Bot API
    does, url-encoded values that are JSON (numbers, objects, lists) are decoded."""
    params = dict(parse_qsl(query))
    if content_type.startswith("application/json"):
        params.update(json.loads(body or b"{}"))
    elif body:
        params.update(parse_qsl(body.decode()))
    for key, value in list(params.items()):
        if isinstance(value, str) and key not in STRING_PARAMS:
            try:
                params[key] = json.loads(value)
            except ValueError:
                pass
    return params


def _handler(tg: FakeTelegram):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the real server

        def setup(self):
            super().setup()
            # Headers and body go out in two writes: without this, Nagle's algorithm and the
            # client's delayed ACK add 40 ms to every answer (the real server has no such delay).
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, *args):  # quiet
            pass

        def _send(self, status: int, body: bytes, content_type: str = "application/json"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, answer: dict):
            self._send(status, json.dumps(answer).encode())

        def _handle(self):
            url = urlsplit(self.path)
            path = unquote(url.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            for prefix, is_file in (("/file/bot", True), ("/bot", False)):
                if path.startswith(prefix):
                    token, _, rest = path[len(prefix):].partition("/")
                    break
            else:
                return self._json(404, _error(404, "Not Found"))
            if token != tg.token:
                return self._json(401, _error(401, "Unauthorized"))
            if is_file:
                data = tg._file(rest)
                if data is None:
                    return self._json(404, _error(404, "Not Found: file not found"))
                return self._send(200, data, "application/octet-stream")
            status, answer = tg._call(rest, _params(url.query, body, self.headers.get("Content-Type", "")))
            self._json(status, answer)

        do_GET = do_POST = _handle

    return Handler


class Process:
    """A command run in the background (the bot), its stdout and stderr lines collected as they come."""

    def __init__(self, argv: list[str], env: dict | None = None):
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self._ended = False  # the output has ended
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 120, start: int = 0) -> str:
        """The first line from line `start` on that matches the regex `pattern`, waiting for it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    if re.search(pattern, line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self._ended:
                    raise AssertionError(f"no line matching {pattern!r} (exit code {self.proc.poll()}); "
                                         f"output:\n{chr(10).join(self.lines)[-3000:]}")
                self._cond.wait(left)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Send `sig` and wait for the exit; its exit code (killed after `timeout` s: AssertionError)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"no exit {timeout} s after signal {sig}; output:\n{self.output[-3000:]}")
        with self._cond:  # the reader takes the last lines
            self._cond.wait_for(lambda: self._ended, 10)
        return code
