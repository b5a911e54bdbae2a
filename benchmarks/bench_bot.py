"""How fast does `dogtl bot` answer photos, beside `dogtl serve` on the same model?

The model is bench_serve's (the real pretrained MobileNetV2 backbone of ../shared/weights at 160 px
with a head trained on scikit-learn's digits, upscaled: real images), the photos its PNG files.
`dogtl bot` runs in its own process against the fake Bot API server of tests/serving/fake_telegram.py
(on loopback, in this process); M chats each send their share of N photos one after another,
the next when the previous is answered (as M people would), and a photo's latency is from the
moment the fake server offers it in getUpdates to the moment the bot's sendMessage arrives
(getUpdates, getFile, the download, decoding, the batched model call and sendMessage; the bot
logs at its default --log-level info). Beside it, `dogtl serve` in its own process with M clients
sending the same number of images in the same way (bench_serve.run_clients). Both run the whole
time and take turns, --rounds times per row, each keeping its best round; both get the same
--max-batch, and each its own default batching window (the bot up to 25 ms while photos are on
their way, serve 5 ms). The ratio is
bot/serve replies per second; CPU per answer is measured on each process over all its rounds.

    python benchmarks/bench_bot.py           # ~4 min on 2 cores
    python benchmarks/bench_bot.py --quick
"""

from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests" / "serving")]

from bench_serve import WEIGHTS, Served, build_model, pct, run_clients, run_users  # noqa: E402
from fake_telegram import TOKEN, FakeTelegram, Process  # noqa: E402


def photo_sizes(payloads: list[bytes]) -> list[tuple[bytes, int, int]]:
    from PIL import Image

    return [(data, *Image.open(io.BytesIO(data)).size) for data in payloads]


def run_chats(tg: FakeTelegram, chats: int, photos: list[tuple[bytes, int, int]], per_chat: int, first_chat: int):
    """(replies/s, latencies in ms): `chats` threads, each sending `per_chat` photos in its own
    chat, the next once the previous is answered."""

    def chat(c: int):
        chat_id, latencies, errors = first_chat + c, [], []
        for i in range(per_chat):
            message_id = tg.send_photo(chat_id, photos[(c * per_chat + i) % len(photos)])
            reply = tg.wait_replies(chat_id, i + 1, timeout=120)[i]
            if reply.reply_to != message_id or not reply.text.startswith(("Most likely", "I'm not sure")):
                errors.append(repr(reply.text))
            latencies.append((reply.at - tg.sent_at(message_id)) * 1000)
        return latencies, errors

    return run_users(chats, chat)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) / 1024


def start_bot(model: Path, tg: FakeTelegram, max_batch: int, batch_wait_ms: float) -> Process:
    env = dict(os.environ, TELEGRAM_BOT_TOKEN=TOKEN, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    bot = Process([sys.executable, "-m", "dogtl.cli", "bot", str(model), "--api-base", tg.api_base,
                   "--max-batch", str(max_batch), "--batch-wait-ms", str(batch_wait_ms)], env=env)
    bot.wait_for(r"answers with", timeout=300)
    return bot


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--photos", type=int, default=160, help="N: photos per measurement, shared by the chats")
    parser.add_argument("--chats", type=int, nargs="+", default=[1, 8, 32], help="M: chats (and serve's clients)")
    parser.add_argument("--max-batch", type=int, default=8, help="both processes' --max-batch (the bot's default)")
    parser.add_argument("--batch-wait-ms", type=float, default=25.0, help="the bot's --batch-wait-ms (default: its own)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per row, the best kept")
    parser.add_argument("--quick", action="store_true", help="48 photos per measurement, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.photos, args.rounds = 48, 1
    if not args.weights.is_file():
        sys.exit(f"{args.weights}: the pretrained backbone weights are needed (see ../shared/weights/README.md)")

    root = Path(tempfile.mkdtemp(prefix="bench-bot-"))
    model_path, files = build_model(root, args.weights)
    payloads = [f.read_bytes() for f in files]
    photos = photo_sizes(payloads)
    print(f"model: mobilenet_v2 ({args.weights.name}) at 160 px + digits head; {len(files)} PNG files; "
          f"{os.cpu_count()} CPUs; {args.photos} photos per row; --max-batch {args.max_batch} for both")
    print("load before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    with FakeTelegram() as tg:
        began = time.monotonic()
        bot = start_bot(model_path, tg, args.max_batch, args.batch_wait_ms)
        served = None
        try:
            run_chats(tg, 1, photos, 1, first_chat=1)
            first_answer = time.monotonic() - began  # a restart's gap: photos wait at Telegram meanwhile
            served = Served(model_path, args.max_batch)  # both up, the idle one waiting on its socket
            run_chats(tg, 4, photos, 3, first_chat=2)  # warm-up
            run_clients(served.port, 4, payloads, 3, 30)
            # Bot and serve alternate, `--rounds` times per row; each keeps its best round, so a
            # burst of other work on the machine lowers a figure but does not decide the ratio.
            best, answers, cpu = {}, [0, 0], [0.0, 0.0]
            chat_ids = iter(range(1000, 10**9, 1000))
            for chats in args.chats:
                share = max(1, args.photos // chats)
                for _ in range(args.rounds):
                    for side, (pid, run) in enumerate([
                            (bot.proc.pid, lambda: run_chats(tg, chats, photos, share, next(chat_ids))),
                            (served.proc.pid, lambda: run_clients(served.port, chats, payloads, share, 600))]):
                        before = cpu_seconds(pid)
                        rps, lat = run()
                        cpu[side] += cpu_seconds(pid) - before
                        answers[side] += len(lat)
                        if (chats, side) not in best or rps > best[chats, side][0]:
                            best[chats, side] = (rps, lat)
            rss = [peak_rss_mb(bot.proc.pid), peak_rss_mb(served.proc.pid)]
        except Exception:
            errors = [k for k, line in enumerate(bot.lines) if " ERROR " in line or " WARNING " in line]
            print("\n".join(bot.lines[errors[0]:errors[0] + 60] if errors else bot.lines[-20:]))
            raise
        finally:
            if served is not None:
                served.stop()
            stopping = time.monotonic()
            code = bot.stop()
            stopped = time.monotonic() - stopping
        calls = re.search(r"answered (\d+) images in (\d+) model calls", bot.output)
        if code != 0 or not calls:
            sys.exit(f"dogtl bot ended with {code}:\n{bot.output[-2000:]}")
    print("load after: ", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print(f"best of {args.rounds} alternating rounds per row")
    print(f"{'chats':>5} | {'bot replies/s':>13} {'p50 ms':>8} {'p99 ms':>8} {'photos':>6} | "
          f"{'serve req/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'requests':>8} | {'bot/serve':>9}")
    for chats in args.chats:
        (bot_rps, bot_lat), (serve_rps, serve_lat) = best[chats, 0], best[chats, 1]
        print(f"{chats:>5} | {bot_rps:13.1f} {pct(bot_lat, 50):8.1f} {pct(bot_lat, 99):8.1f} {len(bot_lat):6d} | "
              f"{serve_rps:11.1f} {pct(serve_lat, 50):8.1f} {pct(serve_lat, 99):8.1f} {len(serve_lat):8d} | "
              f"{bot_rps / serve_rps:9.2f}")
    images, model_calls = int(calls[1]), int(calls[2])
    bot_cpu, serve_cpu = (c / n * 1000 for c, n in zip(cpu, answers))
    print(f"the bot answered {images} photos in {model_calls} model calls ({images / model_calls:.1f} per call); "
          f"from its start to its first answer {first_answer:.1f} s, from SIGTERM to its exit {stopped:.1f} s")
    print(f"CPU per answer over all rounds: bot {bot_cpu:.1f} ms, serve {serve_cpu:.1f} ms (bot/serve "
          f"{bot_cpu / serve_cpu:.2f}); peak resident memory: bot {rss[0]:.0f} MB, serve {rss[1]:.0f} MB")

if __name__ == "__main__":
    main()
