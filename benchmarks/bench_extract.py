"""Extraction images/s against the bare backbone forward pass, and peak memory against N.

In one run, each measured in its own fresh process (so peak memory is its own):
  bare      the frozen backbone (`models.build_backbone`, weights none) called by the same
            tf.function as extraction on random tensors of the same size and batch;
  pipeline  `extract.extract_features` over real JPEG files written by `dogtl.synthetic`
            at the model's input size: tf.data decode + resize + augmentation (1 clean and
            `--passes` augmented passes), backbone, float16, crash-safe batch files, HDF5;
            after each of its batches, a second copy of the backbone runs one bare batch in
            the same process, and pipeline/bare compares the two over the same minutes. (Run
            in processes of their own, minutes apart, the two sides of the ratio moved by +-7%
            with this VM's other tenants, more than the pipeline's own cost.)
The pipeline's images/s is steady state: from the end of its first batch (which traces the
model, like the bare side's untimed warm-up) to its last batch, less the paired bare batches;
the final HDF5 assembly is reported separately. Each precision runs bare, then --rounds rounds
of pipeline N0 and N1, then bare; the median over rounds is the result, and every round is
printed. CPU time per image (all threads) is printed too: the paired bare batches' equals the
bare process's when the pipeline's preparation kept to the pipeline's side.
The preparation alone (decoding, augmentation and batching, no model) is measured once: its
CPU time against the model's bounds pipeline/bare when the model keeps every core busy, as on
a CPU, where the two share the cores.
Peak memory is the process's max RSS (the paired backbone included; and with --trace-python its peak Python-side
allocation, numpy arrays included, via tracemalloc), for two image counts: flat means
bounded memory.
Target: ratio >= 0.95 on CPU.

Precision (issue 13): every run above is repeated for each of --precisions (default float32,
auto and a forced bfloat16, each via the mechanism `core/precision.py` picks here, plus
bfloat16 forced through the other mechanism), and a table prints them side by side: bare and
pipeline images/s, pipeline/bare at each precision, and each precision's speed-up over float32,
with the cosine similarity of its pooled features to float32's on the same batch. Target on a
CPU with AMX/AVX512-BF16: auto >= 1.4x float32. On a CPU without them auto is float32 (1.0x)
and a forced bfloat16 is emulated (slower): the table shows which this machine is.

    python benchmarks/bench_extract.py            # xception at 299 px, 32 per batch, N = 64 and 256, 3 rounds (~35 min on 2 cores)
    python benchmarks/bench_extract.py --quick    # smoke run: resnet50 at 64 px, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """CPU time of this process, all threads: a load-independent measure of work done."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def bare_forward(args, batches: int):
    """The backbone (weights none), `batches` random input batches and the timed forward pass:
    the same tf.function as extraction (extract.py), its output taken to float16 as stored."""
    import numpy as np
    import tensorflow as tf

    from dogtl.core.models import build_backbone
    from dogtl.features.backbones import get_backbone

    model = build_backbone(get_backbone(args.backbone), "none", args.image_size)
    rng = np.random.default_rng(0)
    inputs = [tf.constant(rng.uniform(-1, 1, (args.batch_size, args.image_size, args.image_size, 3)), tf.float32)
              for _ in range(batches)]
    infer = None  # traced on first use, inside the caller's precision (core/precision.computing_in)

    def timed(batch):
        """(seconds, CPU seconds, features) of one forward pass."""
        nonlocal infer
        if infer is None:
            infer = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        started, cpu = time.perf_counter(), cpu_seconds()
        features = np.asarray(infer(batch))
        features.astype(np.float16)
        return time.perf_counter() - started, cpu_seconds() - cpu, features

    return model, inputs, timed


def worker_bare(args) -> dict:
    import numpy as np

    from dogtl.core.precision import computing_in, resolve

    model, batches, timed = bare_forward(args, 2)
    reference = np.asarray(model(batches[0], training=False), np.float64)  # float32 features
    resolved = resolve(args.precision)
    with computing_in(model, resolved, args.how) as how:
        first = timed(batches[0])[2].astype(np.float64)  # warm-up: tracing, first-call allocations
        timed(batches[1])
        runs = [timed(batches[k % 2]) for k in range(args.bare_batches)]
    seconds, cpu = (sum(r[k] for r in runs) for k in (0, 1))
    cosine = np.sum(first * reference, 1) / (np.linalg.norm(first, axis=1) * np.linalg.norm(reference, axis=1) + 1e-30)
    images = args.bare_batches * args.batch_size
    return {"rate": images / seconds, "cpu_ms": 1000 * cpu / images, "rss_mb": peak_rss_mb(),
            "resolved": resolved, "mechanism": how, "cosine": float(cosine.min()),
            "identical": bool(np.array_equal(first, reference))}


def worker_pipeline(args) -> dict:
    """extract_features, with a bare forward of a second copy of the backbone on a fixed batch
    after each of its batches (from its progress callback): each pipeline batch is paired with a
    bare one run in the same process moments later, so a shared machine's drifting load falls on
    both alike. The bare calls run while the pipeline's prefetch buffer is full (the preparation
    refills it within the next pipeline batch, in a small fraction of its time), so the pipeline's
    contention stays on the pipeline's side; their CPU time per image is printed to show it."""
    import tracemalloc

    from dogtl.core.precision import computing_in, resolve
    from dogtl.features.extract import ExtractConfig, extract_features

    reference, (batch,), timed = bare_forward(args, 1)
    if args.trace_python:
        tracemalloc.start()  # slows Python-side work: off unless asked for
    # Steady state runs from the end of the first batch (which traces the model) to the last one.
    pipe = [0.0, 0.0]  # its seconds and CPU seconds, the paired bare batches left out
    bare = []  # (seconds, CPU seconds) of each paired bare batch after the first
    state = {"done": 0, "since": None, "first": None, "ended": None}

    def progress(done, total):
        now = (time.perf_counter(), cpu_seconds())
        if state["first"] is not None and state["done"] < total:
            pipe[0] += now[0] - state["since"][0]
            pipe[1] += now[1] - state["since"][1]
        if done > state["done"]:  # after a batch, not a pass's end
            pair = timed(batch)
            if state["first"] is None:  # the first batch: tracing on both sides
                state["first"] = done
                if args.trace_python:
                    tracemalloc.reset_peak()  # from here on: not the model's construction
            else:
                bare.append(pair)
        state["done"], state["since"] = done, (time.perf_counter(), cpu_seconds())
        if done == total and state["ended"] is None:
            state["ended"] = state["since"][0]

    config = ExtractConfig(data=args.data, cache=str(Path(args.data).parent / f"features-{args.precision}-{time.time_ns()}.h5"),
                           backbone=args.backbone, weights="none", image_size=args.image_size,
                           passes=args.passes, batch_size=args.batch_size, val_fraction=0.0,
                           precision=args.precision)
    with computing_in(reference, resolve(args.precision)):
        timed(batch)  # traced before the pipeline starts
        started = time.perf_counter()
        summary = extract_features(config, progress=progress)
        ended = time.perf_counter()
    py_peak = tracemalloc.get_traced_memory()[1] if args.trace_python else float("nan")
    images, bare_images = state["done"] - state["first"], len(bare) * args.batch_size
    bare_s, bare_cpu = (sum(b[k] for b in bare) for k in (0, 1))
    return {"rate": images / pipe[0], "cpu_ms": 1000 * pipe[1] / images,
            "paired_rate": bare_images / bare_s, "paired_cpu_ms": 1000 * bare_cpu / bare_images,
            "images": state["done"], "assembly_s": ended - state["ended"], "total_s": ended - started,
            "rss_mb": peak_rss_mb(), "py_peak_mb": py_peak / 2**20, "file_mb": summary.file_bytes / 1e6}


def worker_prep(args) -> dict:
    """The pipeline without the model: what decoding, augmentation and batching cost alone."""
    from dogtl.data.folders import load_dataset
    from dogtl.data.images import multi_pass_dataset
    from dogtl.features.backbones import get_backbone
    from dogtl.features.extract import ExtractConfig

    defaults = ExtractConfig()  # the seed and augmentation the pipeline worker extracts with

    paths = [str(p) for p in load_dataset(args.data).paths]
    everything = range(len(paths))
    segments = [(p, everything, everything, paths) for p in range(1 + args.passes)]
    times = []
    for _ in multi_pass_dataset(segments, get_backbone(args.backbone), args.image_size, seed=defaults.seed,
                                augmentation=defaults.augmentation, batch_size=args.batch_size):
        times.append((time.perf_counter(), cpu_seconds()))
    images = (len(times) - 1) * args.batch_size  # from the end of the first batch (tracing) on
    return {"cpu_ms": 1000 * (times[-1][1] - times[0][1]) / images,
            "wall_ms": 1000 * (times[-1][0] - times[0][0]) / images}


def run_worker(kind: str, args, **extra) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--backbone", args.backbone,
           "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
           "--passes", str(args.passes), "--bare-batches", str(args.bare_batches)]
    if args.trace_python:
        cmd.append("--trace-python")
    for k, v in extra.items():
        if v is True:
            cmd.append(f"--{k.replace('_', '-')}")
        elif v is not False:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{kind} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run (resnet50, 64 px, few images)")
    parser.add_argument("--backbone", default="xception")
    parser.add_argument("--image-size", type=int, default=299)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--passes", type=int, default=1, help="augmented passes on top of the clean one")
    parser.add_argument("--counts", type=int, nargs=2, default=[64, 256], help="two image counts")
    parser.add_argument("--bare-batches", type=int, default=4, help="timed batches per bare run")
    parser.add_argument("--rounds", type=int, default=3, help="pipeline runs per precision and count (medians)")
    parser.add_argument("--trace-python", action="store_true",
                        help="also report the pipeline's peak Python-side allocation (tracemalloc; slows it a little)")
    parser.add_argument("--precisions", nargs="+", default=["float32", "auto", "bfloat16:keras", "bfloat16:rewrite"],
                        help="precisions to compare (NAME, or NAME:keras / NAME:rewrite to force that mechanism "
                             "on the bare forward)")
    parser.add_argument("--worker", choices=["bare", "pipeline", "prep"], help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--how", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = {"bare": worker_bare, "pipeline": worker_pipeline, "prep": worker_prep}[args.worker](args)
        print(json.dumps(result))
        return
    if args.quick:
        args.backbone, args.image_size, args.batch_size, args.counts, args.bare_batches = "resnet50", 64, 16, [32, 96], 8
        args.rounds = 1

    from dogtl.data.synthetic import make_kaggle_dataset

    print(f"bench_extract: {args.backbone} (weights none) at {args.image_size} px, batch {args.batch_size}, "
          f"1 clean + {args.passes} augmented passes, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for n in args.counts:
            per_class = -(-n // 4)
            folders[n] = make_kaggle_dataset(Path(tmp) / f"n{n}" / "data", num_classes=4, per_class=per_class,
                                             test_images=0, size=args.image_size, seed=n)
        prep = run_worker("prep", args, data=folders[args.counts[1]])
        # Each pipeline batch is paired with a bare forward in the same process (worker_pipeline),
        # and the median over rounds drops the rounds that another tenant disturbed. The bare
        # workers before and after a precision's pipelines give its features' cosine and its
        # images/s in a process of its own. Every precision's pipeline runs at both counts
        # (float32's also give the memory check).
        rows = {}
        for name in args.precisions:
            precision, _, how = name.partition(":")
            opts = dict(precision=precision, how={"keras": "keras-policy", "rewrite": "onednn-rewrite"}.get(how, False))
            bare, pipes = [run_worker("bare", args, **opts)], []
            # a forced mechanism is measured on the bare forward only (extraction uses core/precision's)
            for _ in range(0 if how else args.rounds):
                for n in args.counts:
                    pipes.append((n, run_worker("pipeline", args, data=folders[n], precision=precision)))
            bare.append(run_worker("bare", args, **opts))
            rows[name] = (bare, pipes)
            print(f"  measured {name}: bare {[round(b['rate'], 2) for b in bare]} img/s, pipeline "
                  f"{[(n, round(p['rate'], 2)) for n, p in pipes]} (N, img/s)", flush=True)
    bare, pipes = rows["float32"]
    print("float32 bare forward: " + ", ".join(f"{b['rate']:.2f}" for b in bare) + " img/s, "
          + ", ".join(f"{b['cpu_ms']:.0f}" for b in bare) + f" CPU-ms/img, peak RSS {max(b['rss_mb'] for b in bare):.0f} MB")
    median = statistics.median
    summary = {}  # name -> {n: (ratios, cpu ratios, pipeline rates)}
    for name, (bare_runs, pipe_runs) in rows.items():
        per_count = summary.setdefault(name, {})
        for n, p in pipe_runs:
            ratios, cpu_ratios, rates = per_count.setdefault(n, ([], [], []))
            ratios.append(p["rate"] / p["paired_rate"])
            cpu_ratios.append(p["paired_cpu_ms"] / p["cpu_ms"])
            rates.append(p["rate"])
            print(f"{name:8s} pipeline N={n:<5d}: {p['rate']:8.2f} img/s  ratio {ratios[-1]:.3f} (paired bare "
                  f"{p['paired_rate']:.2f})  CPU {p['cpu_ms']:.0f} ms/img, ratio {cpu_ratios[-1]:.3f} (paired bare "
                  f"{p['paired_cpu_ms']:.0f})  [{p['images']} image-passes, assembly {p['assembly_s']:.2f} s, "
                  f"total {p['total_s']:.1f} s]  peak RSS {p['rss_mb']:.0f} MB"
                  + (f", peak Python {p['py_peak_mb']:.1f} MB" if args.trace_python else "") + f", file {p['file_mb']:.1f} MB")
    small, large = (next(p for n, p in pipes if n == count) for count in args.counts)
    print(f"memory N={args.counts[0]} -> {args.counts[1]}: RSS {large['rss_mb'] - small['rss_mb']:+.0f} MB"
          + (f", Python {large['py_peak_mb'] - small['py_peak_mb']:+.1f} MB" if args.trace_python else ""))
    print(f"preparation alone (decode, augmentation, batching; no model): {prep['cpu_ms']:.1f} CPU-ms and "
          f"{prep['wall_ms']:.1f} ms per image-pass")
    for name, per_count in summary.items():
        if not per_count:
            continue
        bare_cpu = median(b["cpu_ms"] for b in rows[name][0])
        paired_cpu = median(p["paired_cpu_ms"] for _, p in rows[name][1])
        print(f"{name}: the bare forward's CPU-ms per image in its own process {bare_cpu:.0f}, paired with the "
              f"pipeline {paired_cpu:.0f} (close when the pipeline's preparation kept to the pipeline's side)")
        for n, (ratios, cpu_ratios, _) in per_count.items():
            print(f"{name}: N={n} pipeline / paired bare images/s = {median(ratios):.3f} median of "
                  f"{', '.join(f'{r:.3f}' for r in ratios)} (target >= 0.95); bare / pipeline CPU time per "
                  f"image {median(cpu_ratios):.3f}; with no contention at most "
                  f"{bare_cpu / (bare_cpu + prep['cpu_ms']):.3f} (preparation {prep['cpu_ms']:.1f} of the model's "
                  f"{bare_cpu:.0f} CPU-ms per image)")

    from dogtl.core.precision import cpu_bfloat16

    n0 = args.counts[1]  # the longer run: steadier
    base_bare = median(b["rate"] for b in rows["float32"][0])
    base_pipe = median(summary["float32"][n0][2])
    base_cpu = median(b["cpu_ms"] for b in rows["float32"][0])
    print(f"\nprecision side by side (medians; pipeline at N={n0}; CPU has hardware bfloat16 (avx512_bf16/amx_bf16): "
          f"{'yes' if cpu_bfloat16() else 'no'})")
    print(f"{'precision':16s} {'computes in':11s} {'mechanism':15s} {'bare img/s':>10s} {'pipe img/s':>10s} "
          f"{'pipe/bare':>9s} {'bare vs f32':>11s} {'pipe vs f32':>11s} {'CPU-ms/img':>10s} {'CPU vs f32':>10s} "
          f"{'cos vs f32':>10s}")
    for name, (bare, _) in rows.items():
        b = median(x["rate"] for x in bare)
        p = median(summary[name][n0][2]) if summary[name] else float("nan")
        ratio = median(summary[name][n0][0]) if summary[name] else float("nan")
        cpu = median(x["cpu_ms"] for x in bare)
        print(f"{name:16s} {bare[0]['resolved']:11s} {bare[0]['mechanism']:15s} {b:10.2f} {p:10.2f} {ratio:9.3f} "
              f"{b / base_bare:10.2f}x {p / base_pipe:10.2f}x {cpu:10.0f} {base_cpu / cpu:9.2f}x {bare[0]['cosine']:10.6f}"
              + ("  (bit-identical to float32)" if bare[0]["identical"] and name != "float32" else ""))
    if summary.get("auto"):
        auto_cpu = median(x["cpu_ms"] for x in rows["auto"][0])
        print(f"auto / float32 pipeline images/s = {median(summary['auto'][n0][2]) / base_pipe:.2f}x (target >= 1.4x "
              f"on a CPU with AMX/AVX512-BF16); CPU time per image float32 / auto (bare) = {base_cpu / auto_cpu:.2f}x. "
              "On a shared machine images/s move with the load; CPU time per image hardly does.")


if __name__ == "__main__":
    main()
