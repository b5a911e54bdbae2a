"""Does `dogtl serve` keep up with the model called in-process, and does request batching help?

One model (the real pretrained MobileNetV2 backbone of ../shared/weights at 160 px with a head
trained on scikit-learn's digits, upscaled: real images), the same encoded PNG files for every
measurement. For 1, 8 and 32 concurrent clients on loopback (each bounded by --requests
requests and --seconds seconds), `dogtl serve` runs in its own process with request batching
(--max-batch 32, and 8 at 32 clients) and without (--max-batch 1); clients are threads with
keep-alive connections.
Beside each: the same model in this process on the same files (dogtl's decoder in a thread
pool, then one model call per batch of up to `clients` images, or per image without batching),
and the ratio served/in-process (in-process is measured just before and just after each served
run and the faster is kept, so noise from other work on the machine lowers the ratio, never
raises it).
Runtimes (issue 23): the same with `dogtl serve --runtime onnxruntime|openvino` (the model
converted, core/runtimes.py) at --max-batch 32, beside TensorFlow's, each with its in-process
Predictor on the same runtime; the last table compares each runtime's served requests/s with
TensorFlow's.

    python benchmarks/bench_serve.py                 # ~8 min on 2 cores
    python benchmarks/bench_serve.py --quick
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# ../shared beside the checkout (a worktree's is one folder further up)
WEIGHTS = next((p / "shared" / "weights" / "mobilenet_v2_stanford_dogs.weights.h5" for p in Path(__file__).resolve().parents
                if (p / "shared" / "weights" / "mobilenet_v2_stanford_dogs.weights.h5").is_file()),
               Path(__file__).resolve().parents[1] / ".." / "shared" / "weights" / "mobilenet_v2_stanford_dogs.weights.h5")
SIZE = 160


def build_model(root: Path, weights: Path, per_class: int = 30) -> tuple[Path, list[Path]]:
    """A 'finetuned' dogtl model on digits (backbone + trained head) and PNG files of digits."""
    import keras
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from dogtl.core.artifacts import save_model
    from dogtl.core.metadata import ModelMetadata
    from dogtl.core.models import build_backbone, build_head, compose
    from dogtl.data.images import load_image, preprocess_fn
    from dogtl.core.backbones import get_backbone

    digits = load_digits()
    picked = np.concatenate([np.flatnonzero(digits.target == c)[:per_class] for c in range(10)])
    files = []
    for k in picked:
        pixels = (255 - digits.images[k] * 255 / 16).astype(np.uint8)  # dark digit on white
        path = root / f"digit{k}.png"
        Image.fromarray(pixels).convert("RGB").resize((96, 96), Image.BICUBIC).save(path)
        files.append(path)
    spec = get_backbone("mobilenet_v2")
    backbone = build_backbone(spec, str(weights), SIZE)
    x = preprocess_fn(spec)(np.stack([load_image(str(p), SIZE).numpy() for p in files]))
    features = backbone.predict(x, batch_size=32, verbose=0)
    head = build_head(spec.feature_dim, 10, hidden=(256,), seed=0)
    head.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    head.fit(features, digits.target[picked], epochs=40, batch_size=32, verbose=0)
    model = compose(backbone, head, name="digits")
    path = root / "digits.keras"
    save_model(model, path, ModelMetadata.from_dict({
        "kind": "finetuned", "classes": [f"digit_{c}" for c in range(10)], "backbone": spec.name, "image_size": SIZE,
        "preprocessing": spec.preprocessing, "feature_dim": spec.feature_dim, "weights": "file:" + weights.name,
        "name": "digits"}))
    return path, files


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """`dogtl serve MODEL` in a subprocess, until stopped."""

    def __init__(self, model: Path, max_batch: int, runtime: str = "tensorflow", precision: str = "auto"):
        self.port = free_port()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.proc = subprocess.Popen([sys.executable, "-m", "dogtl.cli", "serve", str(model), "--port",
                                      str(self.port), "--max-batch", str(max_batch), "--runtime", runtime,
                                      "--precision", precision],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 180
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"dogtl serve did not start: {self.proc.stderr.read()[-500:]}")
                time.sleep(0.5)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(60)


def run_users(users: int, user) -> tuple[float, list[float]]:
    """(answers/s, latencies in ms) of `users` threads started together, each running
    user(k) -> (its latencies in ms, its errors); RuntimeError if any went wrong."""
    results: list = [None] * users
    start = threading.Barrier(users + 1)

    def run(k: int):
        start.wait()
        results[k] = user(k)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(users)]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    if None in results:
        raise RuntimeError("a user thread failed (its traceback is above)")
    errors = [e for _, errs in results for e in errs]
    if errors:
        raise RuntimeError(f"{len(errors)} failed, e.g. {errors[0]}")
    latencies = [x for lat, _ in results for x in lat]
    return len(latencies) / elapsed, latencies


def run_clients(port: int, clients: int, payloads: list[bytes], requests: int, seconds: float):
    """(requests/s, latencies in ms) for `clients` threads, each sending up to `requests` images
    for at most `seconds` seconds over one keep-alive connection."""

    def client(k: int):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        latencies, errors = [], []
        stop = time.perf_counter() + seconds
        for i in range(requests):
            if time.perf_counter() > stop:
                break
            body = payloads[(k * requests + i) % len(payloads)]
            t = time.perf_counter()
            conn.request("POST", "/predict", body=body, headers={"content-type": "image/png"})
            response = conn.getresponse()
            answer = json.loads(response.read())
            if response.status != 200:
                errors.append(answer)
            latencies.append((time.perf_counter() - t) * 1000)
        conn.close()
        return latencies, errors

    return run_users(clients, client)


def in_process(predictor, payloads: list[bytes], batch: int, images: int, pool):
    """(images/s, per-call latencies in ms): decode in the pool, then one model call per `batch`."""
    import numpy as np

    latencies, done = [], 0
    began = time.perf_counter()
    while done < images:
        chunk = [payloads[(done + i) % len(payloads)] for i in range(batch)]
        t = time.perf_counter()
        inputs = list(pool.map(predictor.decode, chunk))
        stacked = tuple(np.stack(parts) for parts in zip(*inputs))
        predictor.predict(stacked)
        latencies.append((time.perf_counter() - t) * 1000)
        done += batch
    return done / (time.perf_counter() - began), latencies


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--requests", type=int, default=40, help="most requests per client")
    parser.add_argument("--seconds", type=float, default=15, help="most seconds per client")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--precision", default="auto", help="every server's and in-process predictor's --precision")
    parser.add_argument("--runtimes", nargs="+", default=["tensorflow", "onnxruntime", "openvino"])
    args = parser.parse_args()
    if args.quick:
        args.requests, args.seconds = 10, 5
    if not args.weights.is_file():
        sys.exit(f"{args.weights}: the pretrained backbone weights are needed (see ../shared/weights/README.md)")

    from dogtl.serving.app import Predictor
    from dogtl.serving.model import load_serving_model

    root = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model_path, files = build_model(root, args.weights)
    payloads = [f.read_bytes() for f in files]
    sm = load_serving_model(model_path)
    predictors = {}
    for runtime in args.runtimes:
        predictors[runtime] = Predictor(sm, runtime=runtime, precision=args.precision)
        predictors[runtime].warm_up()  # converted before any timing (the conversion cache)
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2))
    print(f"model: mobilenet_v2 ({args.weights.name}) at {SIZE} px + digits head; {len(files)} PNG files; "
          f"{os.cpu_count()} CPUs; load averages {' '.join(f'{x:.2f}' for x in os.getloadavg())}; clients bounded "
          f"by {args.requests} requests / {args.seconds:.0f} s each; --precision {args.precision} ("
          + ", ".join(f"{r} in {p.forward.precision}" for r, p in predictors.items()) + ")")
    rows = []
    # (runtime, --max-batch, client counts): batching as shipped, a smaller batch, and no batching on
    # TensorFlow; batching as shipped on the other runtimes.
    configs = [("tensorflow", 32, (1, 8, 32)), ("tensorflow", 8, (32,)), ("tensorflow", 1, (1, 8, 32))]
    configs = [c for c in configs if c[0] in args.runtimes]
    configs += [(r, 32, (1, 8, 32)) for r in args.runtimes if r != "tensorflow"]
    for runtime, max_batch, counts in configs:
        predictor = predictors[runtime]
        served = Served(model_path, max_batch, runtime, args.precision)
        try:
            run_clients(served.port, 4, payloads, 3, 10)  # warm-up
            for clients in counts:
                # In-process just before and just after the served run, the faster kept: on a
                # shared machine this makes the ratio conservative.
                batch, images = min(clients, max_batch), 32 * max(2, args.requests // 10)
                before = in_process(predictor, payloads, batch, images, pool)
                rps, lat = run_clients(served.port, clients, payloads, args.requests, args.seconds)
                after = in_process(predictor, payloads, batch, images, pool)
                local_ips, local_lat = max(before, after, key=lambda r: r[0])
                rows.append((clients, max_batch, rps, pct(lat, 50), pct(lat, 99), len(lat),
                             local_ips, statistics.median(local_lat), rps / local_ips, runtime))
        finally:
            served.stop()
    print(f"{'runtime':>11} {'clients':>7} {'--max-batch':>11} | {'served req/s':>12} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'requests':>8} | {'in-process img/s':>16} {'batch':>5} {'per call ms':>11} | {'ratio':>5}")
    for c, b, rps, p50, p99, n, ips, call_ms, ratio, runtime in rows:
        print(f"{runtime:>11} {c:>7} {b:>11} | {rps:12.1f} {p50:8.1f} {p99:8.1f} {n:8d} | {ips:16.1f} {min(c, b):>5} "
              f"{call_ms:11.1f} | {ratio:5.2f}")
    on32 = next((r for r in rows if r[0] == 32 and r[1] == 32 and r[9] == "tensorflow"), None)
    off32 = next((r for r in rows if r[0] == 32 and r[1] == 1), None)
    if on32 and off32:
        print(f"32 clients: served with batching at {on32[8]:.2f} of in-process batched throughput (target >= 0.80); "
              f"--max-batch 32 serves {on32[2] / off32[2]:.2f}x the requests/s of --max-batch 1")
    for clients in (1, 8, 32):
        base = next((r for r in rows if r[0] == clients and r[1] == 32 and r[9] == "tensorflow"), None)
        others = [r for r in rows if r[0] == clients and r[1] == 32 and r[9] != "tensorflow"]
        if base and others:
            print(f"{clients} client(s), --max-batch 32: served req/s over TensorFlow's: " + ", ".join(
                f"{r[9]} {r[2] / base[2]:.2f}x (in-process {r[6] / base[6]:.2f}x)" for r in others))

if __name__ == "__main__":
    main()
