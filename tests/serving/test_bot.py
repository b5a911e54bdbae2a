"""dogtl bot: the real bot process (one for the module) against a fake Bot API server on loopback
(fake_telegram.py), and its start-up errors in-process. No part of python-telegram-bot is mocked."""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import sys
import time

import numpy as np
import pytest

import _tiny
from conftest import assert_clean_error, run_cli
from fake_telegram import TOKEN, FakeTelegram, Process

pytest.importorskip("telegram", reason="the bot extra is not installed: pip install 'dogtl[bot]'")
pytest.importorskip("aiolimiter", reason="the bot extra is not installed: pip install 'dogtl[bot]'")

MAX_FILE_MB = 1
MIN_CONFIDENCE = 0.55
SECRET = TOKEN.split(":")[1]


@pytest.fixture(scope="module")
def expected():
    return _tiny.predicted()


@pytest.fixture(scope="module")
def threshold(expected):
    """The bot's --min-confidence: between the test images' top probabilities (0.37-0.43 and
    0.67-0.83), so some answers are sure and some not."""
    tops = expected.max(axis=1)
    assert (tops < MIN_CONFIDENCE).any() and (tops > MIN_CONFIDENCE).any(), tops
    assert np.abs(tops - MIN_CONFIDENCE).min() > 0.01, tops  # no answer decided by rounding
    return MIN_CONFIDENCE


@pytest.fixture(scope="module")
def tg():
    with FakeTelegram() as server:
        yield server


def _start_bot(tg: FakeTelegram, *options: str) -> Process:
    """`dogtl bot` on the tiny model in its own process, the token from TELEGRAM_BOT_TOKEN."""
    env = dict(os.environ, TELEGRAM_BOT_TOKEN=TOKEN, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return Process([sys.executable, "-m", "dogtl.cli", "bot", str(_tiny.model_path()), "--api-base", tg.api_base,
                    "--min-confidence", str(MIN_CONFIDENCE), *options], env=env)


@pytest.fixture(scope="module")
def bot(tg, request):
    """`dogtl bot` at --log-level debug (every request's URL is logged: the token must still not
    appear), with a long batching window so that photos arriving together surely share a model call."""
    process = _start_bot(tg, "--batch-wait-ms", "150", "--max-batch", "8", "--max-file-mb", str(MAX_FILE_MB),
                         "--log-level", "debug")
    try:
        request.getfixturevalue("threshold")  # computed while the bot starts
        process.wait_for(r"is answering with tiny", timeout=300)
        yield process
    finally:
        if process.proc.poll() is None:
            process.proc.kill()


def _named(reply: str) -> list[tuple[str, int]]:
    """(class, percent) pairs in a reply, in order."""
    return [(name, 100 if over else int(pct))
            for name, over, pct in re.findall(r"an? ([\w' -]+?) \((over )?(\d+)%\)", reply)]


def _assert_answer(reply: str, row: np.ndarray, threshold: float):
    """The reply names the model's own top classes for the image, with their percentages."""
    order = np.argsort(-row)
    named = _named(reply)
    assert [n for n, _ in named] == [_tiny.CLASSES[j] for j in order[: len(named)]], (reply, row)
    assert len(named) == 1 + sum(row[j] >= 0.01 for j in order[1:3]), (reply, row)  # under 1% left out
    for (_, pct), j in zip(named, order):
        assert abs(pct - row[j] * 100) <= 1, (reply, row)
    if row.max() >= threshold:
        assert reply.startswith(f"Most likely a {_tiny.CLASSES[order[0]]} ("), reply
    else:
        assert reply.startswith("I'm not sure"), reply


def test_start_and_help(tg, bot):
    tg.send_text(1, "/start")
    tg.send_text(1, "/help")
    start, help_ = (r.text for r in tg.wait_replies(1, 2))
    assert "photo of a dog" in start and "4 breeds" in start and "beagle" in start and "/help" in start
    assert f"{MAX_FILE_MB} MB" in help_ and "not sure" in help_ and "JPEG" in help_
    assert [p for p in tg.calls("setMyCommands")], "the command menu is set"


def test_photo_gets_the_models_top_class(tg, bot, expected, threshold):
    images = _tiny.images()
    data = [p.read_bytes() for p in images]
    sent = {}
    for k in range(len(images)):
        sent[k] = tg.send_photo(100 + k, data[k])
    # Several sizes, as Telegram sends them: the bot takes the smallest that is not under the
    # model's 32 px (here the 40x40 one, image 5), not the 16 px thumbnail (image 6) or the largest (7).
    sizes = tg.send_photo(200, (data[6], 16, 16), (data[5], 40, 40), (data[7], 800, 800))
    for k in range(len(images)):
        (reply,) = tg.wait_replies(100 + k)
        assert reply.reply_to == sent[k]
        _assert_answer(reply.text, expected[k], threshold)
    (reply,) = tg.wait_replies(200)
    assert reply.reply_to == sizes
    _assert_answer(reply.text, expected[5], threshold)
    assert {_named(r.text)[0][0] for r in tg.replies() if r.chat_id >= 100} == {
        _tiny.CLASSES[j] for j in expected.argmax(axis=1)}
    answers = [r.text for r in tg.replies() if r.chat_id >= 100]
    assert any(a.startswith("Most likely") for a in answers) and any(a.startswith("I'm not sure") for a in answers)


def test_image_sent_as_a_file(tg, bot, expected, threshold):
    images = _tiny.images()
    tg.send_document(300, images[3].read_bytes(), "rex.png", "image/png")
    tg.send_document(301, images[2].read_bytes(), "rex.JPG", "application/octet-stream")  # told by its name
    _assert_answer(tg.wait_replies(300)[0].text, expected[3], threshold)
    _assert_answer(tg.wait_replies(301)[0].text, expected[2], threshold)


def _bomb() -> bytes:
    """A PNG header claiming 100000 x 100000 pixels."""
    return (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + (100_000).to_bytes(4, "big") * 2
            + b"\x08\x02\x00\x00\x00" + bytes(16))


def test_every_other_message_gets_its_reply_and_the_bot_goes_on(tg, bot, expected, threshold):
    good = _tiny.images()[0].read_bytes()
    big = MAX_FILE_MB * 1024 * 1024 + 1
    cases = {  # chat: (what the user sends, what the reply must say)
        400: (lambda c: tg.send_text(c, "what breed is my dog?"), "I only look at pictures"),
        401: (lambda c: tg.send_text(c, "/breed"), "I only look at pictures"),
        402: (lambda c: tg.send(c, **tg.media("sticker")), "sticker"),
        403: (lambda c: tg.send(c, **tg.media("video")), "can't watch videos"),
        404: (lambda c: tg.send(c, **tg.media("animation")), "can't watch videos"),
        405: (lambda c: tg.send(c, **tg.media("voice")), "don't know what to do with that"),
        406: (lambda c: tg.send(c, **tg.media("location")), "don't know what to do with that"),
        407: (lambda c: tg.send_document(c, b"id,breed\n1,beagle\n", "labels.csv", "text/csv"),
              r"\(labels\.csv\) is not an image"),
        408: (lambda c: tg.send_document(c, good[: len(good) // 2], "half.jpg", "image/jpeg"),
              r"couldn't read that file as an image \(truncated JPEG"),
        409: (lambda c: tg.send_document(c, b"id,breed\n", "fake.jpg", "image/jpeg"),
              r"couldn't read that file as an image \(not an image"),
        410: (lambda c: tg.send_document(c, good, "huge.jpg", "image/jpeg", size=5 * 1024 * 1024),
              rf"5\.0 MB, over my limit of {MAX_FILE_MB} MB"),  # refused from the size Telegram states
        411: (lambda c: tg.send_document(c, good + bytes(big), "quiet.jpg", "image/jpeg", declare_size=False),
              rf"1\.0 MB, over my limit of {MAX_FILE_MB} MB"),  # no size stated: measured after download
        412: (lambda c: tg.send_document(c, good, "huge.png", "image/png", size=30 * 1024 * 1024, declare_size=False),
              f"over my limit of {MAX_FILE_MB} MB"),  # no size stated: getFile refuses over 20 MB
        413: (lambda c: tg.send_document(c, _bomb(), "bomb.png", "image/png"), "too many pixels"),
        414: (lambda c: tg.send_document(c, b"", "empty.jpg", "image/jpeg"), "That file is empty"),
    }
    sent = {chat: send(chat) for chat, (send, _) in cases.items()}
    for chat, (_, needle) in cases.items():
        (reply,) = tg.wait_replies(chat)
        assert re.search(needle, reply.text), (chat, reply.text)
        assert reply.reply_to == sent[chat]
    # In a group the bot answers photos only: no hints to every line of a conversation.
    tg.send_text(-500, "nice dog!")
    tg.send(-500, **tg.media("sticker"))
    photo = tg.send_photo(-500, good)
    (reply,) = tg.wait_replies(-500)
    assert reply.reply_to == photo
    _assert_answer(reply.text, expected[0], threshold)
    tg.send_photo(415, good)  # and after all that, photos are still answered
    _assert_answer(tg.wait_replies(415)[0].text, expected[0], threshold)
    assert len(tg.replies(-500)) == 1
    assert bot.proc.poll() is None


def test_flood_control_answer_is_waited_out(tg, bot, expected, threshold):
    """Telegram's 429 "retry after 1": the bot waits and sends the reply again."""
    tg.flood(450, retry_after=1)
    tg.send_photo(450, _tiny.images()[2].read_bytes())
    (reply,) = tg.wait_replies(450)
    _assert_answer(reply.text, expected[2], threshold)
    tries = [p for p in tg.calls("sendMessage") if p["chat_id"] == 450]
    assert len(tries) == 2 and tries[0]["text"] == reply.text


def test_concurrent_photos_from_many_chats_share_model_calls(tg, bot, expected, threshold):
    """16 photos from 8 chats at once, one of them behind a 3 s download: all answered right, the
    slow one last, and the others in model calls of several images."""
    images = _tiny.images()
    first_line = len(bot.lines)
    slow = tg.send_photo(600, images[1].read_bytes(), delay_s=3)
    sent = []
    for chat in range(601, 609):
        for k in (chat % 8, (chat + 3) % 8):
            sent.append((chat, k, tg.send_photo(chat, images[k].read_bytes())))
    for chat in range(601, 609):
        replies = {r.reply_to: r for r in tg.wait_replies(chat, 2)}
        for c, k, message_id in sent:
            if c == chat:
                _assert_answer(replies[message_id].text, expected[k], threshold)
    (slow_reply,) = tg.wait_replies(600, timeout=60)
    _assert_answer(slow_reply.text, expected[1], threshold)
    fast = [r for r in tg.replies() if 601 <= r.chat_id <= 608]
    assert max(r.at for r in fast) < slow_reply.at, "a slow download held up the other chats"
    assert max(r.at for r in fast) - tg.sent_at(slow) < 3, "the other chats waited for the slow download"
    deadline = time.monotonic() + 30  # the log lines may trail the replies a little
    while True:
        calls = [int(m) for m in re.findall(r"model call on (\d+) images", "\n".join(bot.lines[first_line:]))]
        if sum(calls) >= 17 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert sum(calls) == 17 and max(calls) > 1, calls


def test_sigterm_answers_the_photo_in_hand_and_stops_cleanly(tg, bot, expected, threshold):
    """Run last: SIGTERM while a photo is downloading. The photo is still answered, the updates
    fetched are confirmed to the server, and the process exits 0 with no token in its output."""
    asked = len(tg.calls("getFile"))
    photo = tg.send_photo(700, _tiny.images()[4].read_bytes(), delay_s=1.5)
    deadline = time.monotonic() + 60
    while len(tg.calls("getFile")) == asked and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # its download is under way
    assert bot.stop(signal.SIGTERM, timeout=60) == 0
    (reply,) = tg.replies(700)
    assert reply.reply_to == photo
    _assert_answer(reply.text, expected[4], threshold)
    last_update = len(tg.calls("getUpdates")) and tg.calls("getUpdates")[-1]
    assert last_update["timeout"] == 0 and last_update["offset"] > 0  # the cleanup call marks all as read
    output = bot.output
    assert output.rstrip().endswith("stopped"), output[-2000:]
    assert re.search(r"answered \d+ images in \d+ model calls", output)
    assert "Traceback" not in output, output
    assert "/bot<token>/getUpdates" in output  # httpx logged its URLs at debug, redacted
    assert SECRET not in output and SECRET.replace("-", "%2D") not in output


@pytest.mark.slow
def test_restart_loses_no_photo(expected, threshold):
    """A restart (the way to update the model): the photo in hand when SIGTERM comes is answered
    by the old process, a photo sent while no bot runs by the new one, and none twice."""
    good = [p.read_bytes() for p in _tiny.images()]
    with FakeTelegram() as tg:
        old = _start_bot(tg)
        first = tg.send_photo(1, good[0])
        tg.wait_replies(1, timeout=300)
        in_hand = tg.send_photo(2, good[1], delay_s=1.5)
        deadline = time.monotonic() + 60
        while not any(p["file_id"] == "file-2" for p in tg.calls("getFile")) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert old.stop(signal.SIGTERM, timeout=60) == 0
        while_down = tg.send_photo(3, good[2])
        new = _start_bot(tg)
        try:
            tg.wait_replies(3, timeout=300)
            time.sleep(1)  # time for a wrong second answer to arrive
        finally:
            assert new.stop() == 0
    answers = {}
    for reply in tg.replies():
        answers.setdefault(reply.reply_to, []).append(reply.text)
    assert sorted(answers) == [first, in_hand, while_down] and all(len(a) == 1 for a in answers.values()), answers
    for message_id, k in ((first, 0), (in_hand, 1), (while_down, 2)):
        _assert_answer(answers[message_id][0], expected[k], threshold)
    assert "chat 3:" in new.output and "chat 3:" not in old.output


# ---- start-up errors, in-process -----------------------------------------------------------

def test_bad_token_is_a_one_line_error_without_the_token(tg):
    wrong = "987654321:AAE-wrong_token-0123456789abcdefghij"
    result = run_cli("bot", _tiny.model_path(), "--telegram-token", wrong, "--api-base", tg.api_base)
    line = assert_clean_error(result, "rejected the bot token", "TELEGRAM_BOT_TOKEN")
    assert wrong.split(":")[1] not in result.output and wrong.split(":")[1] not in line


def test_start_up_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("TELEGRAM_BOT_TOKEN", raising=False)
    model = _tiny.model_path()
    assert_clean_error(run_cli("bot", model), "no bot token", "--telegram-token", "TELEGRAM_BOT_TOKEN")
    line = assert_clean_error(run_cli("bot", model, "--telegram-token", "not a token AAE-secret"),
                              "does not look like")
    assert "secret" not in line
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_cli("bot", model, "--telegram-token", TOKEN, "--api-base", f"http://127.0.0.1:{port}/bot")
    assert_clean_error(result, f"cannot reach the Bot API at http://127.0.0.1:{port}/bot", "--api-base")
    assert SECRET not in result.output
    for base, needle in [("ftp://example.org/bot", "give the Bot API's URL"), ("127.0.0.1:8081", "give the Bot API"),
                         ("http://127.0.0.1:8081/api", "must end in /bot"),
                         (f"https://api.telegram.org/bot{TOKEN}", "must end in /bot")]:
        result = run_cli("bot", model, "--telegram-token", TOKEN, "--api-base", base)
        assert_clean_error(result, needle)
        assert SECRET not in result.output, base
    assert_clean_error(run_cli("bot", model, "--telegram-token", TOKEN, "--top", "0"), "--top 0")
    assert_clean_error(run_cli("bot", model, "--telegram-token", TOKEN, "--min-confidence", "50"),
                       "--min-confidence 50")
    assert_clean_error(run_cli("bot", model, "--telegram-token", TOKEN, "--runtime", "tensorrt"), "--runtime 'tensorrt'")


def test_api_urls_in_the_bot_apis_form():
    from dogtl.serving.bot import api_urls

    assert api_urls("https://api.telegram.org/bot") == ("https://api.telegram.org/bot",
                                                       "https://api.telegram.org/file/bot")
    assert api_urls("http://127.0.0.1:8081/bot/") == ("http://127.0.0.1:8081/bot", "http://127.0.0.1:8081/file/bot")
    assert api_urls("http://127.0.0.1:8081") == ("http://127.0.0.1:8081/bot", "http://127.0.0.1:8081/file/bot")
    assert api_urls("https://proxy.example/telegram/bot")[1] == "https://proxy.example/telegram/file/bot"


# ---- replies in words, and the log filter --------------------------------------------------

def test_replies_in_words():
    from dogtl.serving.bot_replies import describe, readable

    assert readable("german_short-haired_pointer") == "german short-haired pointer"
    assert readable("n02085620-Chihuahua") == "Chihuahua"
    assert readable("  black-and-tan__coonhound ") == "black-and-tan coonhound"
    assert describe([("beagle", 0.91), ("basset", 0.06), ("pug", 0.004)], 0.5) == \
        "Most likely a beagle (91%); maybe a basset (6%)."
    assert describe([("afghan_hound", 0.998), ("basset", 0.001)], 0.5) == "Most likely an afghan hound (over 99%)."
    assert describe([("eskimo_dog", 0.6), ("malamute", 0.3), ("siberian_husky", 0.1)], 0.5) == \
        "Most likely an eskimo dog (60%); maybe a malamute (30%) or a siberian husky (10%)."
    unsure = describe([("collie", 0.34), ("shetland_sheepdog", 0.30), ("borzoi", 0.12)], 0.5)
    assert unsure.startswith("I'm not sure") and "a collie (34%), a shetland sheepdog (30%) or a borzoi (12%)" in unsure
    assert describe([("3", 0.7), ("8", 0.2)], 0.5) == "Most likely 3 (70%); maybe 8 (20%)."


def test_token_is_redacted_from_log_records():
    from dogtl.serving.bot import TokenRedactor

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(TokenRedactor(TOKEN))
    logger = logging.getLogger("test_bot.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("HTTP Request: POST %s/getUpdates", f"https://api.telegram.org/bot{TOKEN}")
        logger.warning("GET https://api.telegram.org/file/bot%s/photos/1.jpg", TOKEN.replace(":", "%3A"))
        try:
            raise RuntimeError(f"The token `{TOKEN}` was rejected by the server.")
        except RuntimeError:
            logger.exception("failed")
        logger.warning("another bot's token 111222333:AAAbbbCCCdddEEEfffGGGhhh-iii leaked")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert SECRET not in text and "AAAbbbCCC" not in text
    assert text.count("<token>") == 4 and "/bot<token>/getUpdates" in text
