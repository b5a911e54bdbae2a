"""Extraction images/s on each runtime against TensorFlow, against the bare forward pass, and
peak memory against N.

Runtimes (issue 23; the default run): for each of --backbones (xception at 299 px,
mobilenet_v2, efficientnet_v2_s and convnext_tiny at 224, weights none) and each runtime
(tensorflow, onnxruntime, openvino; `auto` is the one core/runtimes.py picks here) at each of
--runtime-precisions (float32, the targets' precision, and auto), one process per (backbone,
runtime, precision) measures the bare forward (random tensors, the runtime's forward as
extraction builds it, core/runtimes.frozen_forward) and the full pipeline (extract_features
with --runtime, paired with bare batches as below), --rounds times; the table prints the
medians, each runtime's ratio to TensorFlow (bare and pipeline) and pipeline/bare. Conversions
happen before any timing, into the conversion cache (reused by later runs). The per-image
cosine of each runtime's features to TensorFlow's is measured with the real pretrained
MobileNetV2 of ../shared/weights on real photos (/work/data/fashion's test images, else
scikit-learn's digits) at 224 px, float32 and auto.
Targets on a 2-core CPU at float32: auto >= 1.5x TensorFlow on xception, >= 3x on
mobilenet_v2, >= 5x on convnext_tiny, pipeline/bare >= 0.95; cosine >= 0.9999 per image.

    python benchmarks/bench_extract.py                   # the runtime study (~25 min on 2 cores, + conversions once)
    python benchmarks/bench_extract.py --quick           # smoke run: mobilenet_v2 at 96 px, 1 round
    python benchmarks/bench_extract.py --precision-study # issue 13's precision study below

Precision study (--precision-study):

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

    python benchmarks/bench_extract.py --precision-study           # xception at 299 px, N = 64 and 256, 3 rounds (~35 min)
    python benchmarks/bench_extract.py --precision-study --quick   # smoke run: resnet50 at 64 px, seconds
"""

from __future__ import annotations

import argparse
import contextlib
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
    the forward extraction builds (core/runtimes.frozen_forward: on TensorFlow the same
    tf.function, traced on first use inside the caller's precision; on another runtime its
    converted model, compiled in the precision), its output taken to float16 as stored."""
    import numpy as np
    import tensorflow as tf

    from dogtl.core.models import build_backbone
    from dogtl.core.runtimes import frozen_forward
    from dogtl.core.backbones import get_backbone

    spec = get_backbone(args.backbone)
    model = build_backbone(spec, "none", args.image_size)
    rng = np.random.default_rng(0)
    inputs = [tf.constant(rng.uniform(-1, 1, (args.batch_size, args.image_size, args.image_size, 3)), tf.float32)
              for _ in range(batches)]
    forward = frozen_forward(model, runtime=args.runtime, precision=args.precision,
                             label=f"{spec.name}-{args.image_size}")
    if forward.runtime != args.runtime and args.runtime != "auto":
        sys.exit(f"{args.runtime} cannot run {spec.name}: {forward.fell_back}")

    def timed(batch):
        """(seconds, CPU seconds, features) of one forward pass."""
        started, cpu = time.perf_counter(), cpu_seconds()
        features = np.asarray(forward(batch))
        features.astype(np.float16)
        return time.perf_counter() - started, cpu_seconds() - cpu, features

    timed.forward = forward
    return model, inputs, timed


def worker_bare(args) -> dict:
    import numpy as np

    from dogtl.core.precision import computing_in

    model, batches, timed = bare_forward(args, 2)
    reference = np.asarray(model(batches[0], training=False), np.float64)  # float32 features
    resolved = timed.forward.precision
    with (computing_in(model, resolved, args.how) if timed.forward.runtime == "tensorflow"
          else contextlib.nullcontext(args.runtime)) as how:
        first = timed(batches[0])[2].astype(np.float64)  # warm-up: tracing, first-call allocations
        timed(batches[1])
        runs = [timed(batches[k % 2]) for k in range(args.bare_batches)]
    seconds, cpu = (sum(r[k] for r in runs) for k in (0, 1))
    cosine = np.sum(first * reference, 1) / (np.linalg.norm(first, axis=1) * np.linalg.norm(reference, axis=1) + 1e-30)
    images = args.bare_batches * args.batch_size
    return {"rate": images / seconds, "cpu_ms": 1000 * cpu / images, "rss_mb": peak_rss_mb(),
            "resolved": resolved, "mechanism": how, "cosine": float(cosine.min()), "runtime": timed.forward.runtime,
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
    from dogtl.features.extract import extract_features
    from dogtl.features.settings import ExtractConfig

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
                           precision=args.precision, runtime=args.runtime)
    with (computing_in(reference, resolve(args.precision)) if timed.forward.runtime == "tensorflow"
          else contextlib.nullcontext()):
        timed(batch)  # traced before the pipeline starts
        started = time.perf_counter()
        summary = extract_features(config, progress=progress)
        ended = time.perf_counter()
    py_peak = tracemalloc.get_traced_memory()[1] if args.trace_python else float("nan")
    images, bare_images = state["done"] - state["first"], len(bare) * args.batch_size
    bare_s, bare_cpu = (sum(b[k] for b in bare) for k in (0, 1))
    return {"rate": images / pipe[0], "cpu_ms": 1000 * pipe[1] / images, "runtime": summary.runtime,
            "paired_rate": bare_images / bare_s, "paired_cpu_ms": 1000 * bare_cpu / bare_images,
            "images": state["done"], "assembly_s": ended - state["ended"], "total_s": ended - started,
            "rss_mb": peak_rss_mb(), "py_peak_mb": py_peak / 2**20, "file_mb": summary.file_bytes / 1e6}


def worker_prep(args) -> dict:
    """The pipeline without the model: what decoding, augmentation and batching cost alone."""
    from dogtl.data.folders import load_dataset
    from dogtl.data.images import multi_pass_dataset
    from dogtl.core.backbones import get_backbone
    from dogtl.features.settings import ExtractConfig

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


def worker_side_by_side(args) -> dict:
    """Every runtime's bare forward in one process, batch after batch in turn (TensorFlow, ONNX
    Runtime, OpenVINO, TensorFlow, ...), so a shared machine's drifting load falls on all alike:
    per runtime the median seconds per batch, and the median over turns of TensorFlow's seconds
    over the runtime's in the same turn."""
    import statistics

    import numpy as np

    from dogtl.core.models import build_backbone
    from dogtl.core.runtimes import frozen_forward
    from dogtl.core.backbones import get_backbone

    spec = get_backbone(args.backbone)
    model = build_backbone(spec, "none", args.image_size)
    rng = np.random.default_rng(0)
    batch = rng.uniform(-1, 1, (args.batch_size, args.image_size, args.image_size, 3)).astype(np.float32)
    forwards = {}
    for runtime in RUNTIMES:
        try:
            forward = frozen_forward(model, runtime=runtime, precision=args.precision,
                                     label=f"{spec.name}-{args.image_size}")
        except Exception as e:  # noqa: BLE001  a precision the runtime refuses
            forwards[runtime] = str(e)[:100]
            continue
        forwards[runtime] = forward if forward.runtime == runtime else f"fell back: {forward.fell_back}"
    usable = {r: f for r, f in forwards.items() if not isinstance(f, str)}
    seconds, cpu = {r: [] for r in usable}, {r: [] for r in usable}
    for turn in range(1 + args.bare_batches):
        for runtime, forward in usable.items():
            with forward:
                started, used = time.perf_counter(), cpu_seconds()
                np.asarray(forward(batch)).astype(np.float16)
                if turn:  # turn 0 warms up (tracing, first-call allocations)
                    seconds[runtime].append(time.perf_counter() - started)
                    cpu[runtime].append(cpu_seconds() - used)
    out = {r: (f if isinstance(f, str) else None) for r, f in forwards.items()}
    for runtime, times in seconds.items():
        out[runtime] = {"rate": args.batch_size / statistics.median(times), "precision": usable[runtime].precision,
                        "vs_tf": statistics.median(t / s for t, s in zip(seconds["tensorflow"], times)),
                        "cpu_ms": 1000 * statistics.median(cpu[runtime]) / args.batch_size,
                        "cpu_vs_tf": statistics.median(cpu["tensorflow"]) / statistics.median(cpu[runtime])}
    return out


def worker_cosine(args) -> dict:
    """Per-image cosine of each runtime's features to TensorFlow's float32 ones: the real
    pretrained MobileNetV2 on real photos, at --image-size."""
    import numpy as np

    from dogtl.core.models import build_backbone
    from dogtl.core.conversions import agreement
    from dogtl.core.runtimes import frozen_forward
    from dogtl.data.images import image_dataset
    from dogtl.core.backbones import get_backbone

    spec = get_backbone("mobilenet_v2")
    model = build_backbone(spec, str(WEIGHTS), args.image_size)
    images = np.concatenate([x.numpy() for _, _, x in image_dataset(photos(args.data), spec, args.image_size,
                                                                     batch_size=32)])
    want = np.asarray(model.predict(images, batch_size=32, verbose=0), np.float64)
    out = {}
    for precision in ("float32", "auto"):
        for runtime in ("tensorflow", "onnxruntime", "openvino"):
            try:
                forward = frozen_forward(model, runtime=runtime, precision=precision,
                                         label=f"mobilenet_v2-stanford-dogs-{args.image_size}")
            except Exception as e:  # noqa: BLE001  a precision the runtime refuses
                out[f"{runtime}/{precision}"] = str(e)[:80]
                continue
            with forward:
                got = np.concatenate([np.asarray(forward(images[i:i + 32]), np.float64)
                                      for i in range(0, len(images), 32)])
            a, b = got, want
            cosine = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            out[f"{runtime}/{precision}"] = {"runtime": forward.runtime, "precision": forward.precision,
                                              "images": len(images), "cosine_min": float(cosine.min()),
                                              "cosine_median": float(np.median(cosine)),
                                              "relative": agreement(got, want)["relative"]}
    return out


# ../shared beside the checkout (a worktree's is one folder further up)
WEIGHTS = next((p / "shared" / "weights" / "mobilenet_v2_stanford_dogs.weights.h5" for p in Path(__file__).resolve().parents
                if (p / "shared" / "weights" / "mobilenet_v2_stanford_dogs.weights.h5").is_file()),
               Path(__file__).resolve().parents[1] / ".." / "shared" / "weights" / "mobilenet_v2_stanford_dogs.weights.h5")
FASHION = Path("/work/data/fashion/test")


def photos(folder: str, count: int = 64) -> list[Path]:
    """Real photos: the Fashion set's test images if they are here, else scikit-learn's digits,
    upscaled, written into `folder`."""
    if FASHION.is_dir():
        return sorted(FASHION.glob("*.jpg"))[:count]
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits, paths = load_digits(), []
    for k in range(count):
        paths.append(Path(folder) / f"digit{k}.png")
        Image.fromarray((255 - digits.images[k] * 255 / 16).astype(np.uint8)).convert("RGB").resize(
            (96, 96), Image.BICUBIC).save(paths[-1])
    return paths


def run_worker(kind: str, args, **extra) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--backbone", args.backbone,
           "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
           "--passes", str(args.passes), "--bare-batches", str(args.bare_batches), "--runtime", args.runtime]
    if args.trace_python:
        cmd.append("--trace-python")
    for k, v in extra.items():
        if v is True:
            cmd.append(f"--{k.replace('_', '-')}")
        elif v is not False:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        if args.keep_going:
            said = [line for line in out.stderr.strip().splitlines() if line.strip() and not line.startswith(
                ("I0000", "W0000", "E0000", "WARNING: All", "To enable"))]
            return {"failed": f"exit {out.returncode}: " + (said or ["?"])[-1][:160]}
        sys.exit(f"{kind} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# (backbone, image size, images): about half a minute of TensorFlow's pipeline each on 2 cores.
STUDY = (("xception", 299, 64), ("mobilenet_v2", 224, 320), ("efficientnet_v2_s", 224, 96), ("convnext_tiny", 224, 64))
RUNTIMES = ("tensorflow", "onnxruntime", "openvino")


def machine() -> str:
    import platform

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "?")
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    return (f"{model}, {os.cpu_count()} CPUs ({', '.join(isa)}), {platform.python_version()}; load averages "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def runtime_study(args) -> None:
    import statistics

    from dogtl.core.forward import runtime_version
    from dogtl.core.runtimes import plan
    from dogtl.data.synthetic import make_kaggle_dataset

    median = statistics.median
    auto = {p: plan("auto", p) for p in args.runtime_precisions}
    print(f"bench_extract runtimes: {machine()}")
    print("versions: " + ", ".join(runtime_version(r) for r in RUNTIMES) + "; auto here = "
          + ", ".join(f"{r} in {q} at --precision {p}" for p, (r, q) in auto.items()))
    print(f"batch {args.batch_size}, 1 clean + {args.passes} augmented passes, weights none, {args.rounds} rounds "
          "(medians); bare = the paired bare batches of the same process")
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        folders, prep = {}, {}
        for backbone, size, n in args.study:
            if size not in folders:
                folders[size] = make_kaggle_dataset(Path(tmp) / f"s{size}" / "data", num_classes=4,
                                                    per_class=-(-max(m for _, z, m in args.study if z == size) // 4),
                                                    test_images=0, size=size, seed=size)
                args.backbone, args.image_size = backbone, size
                prep[size] = run_worker("prep", args, data=folders[size])
        for backbone, size, n in args.study:
            args.backbone, args.image_size = backbone, size
            data = Path(tmp) / f"{backbone}" / "data"  # the first n images of the size's folder
            make_subset(folders[size], data, n)
            for precision in args.runtime_precisions:
                side = run_worker("side", args, precision=precision, bare_batches=args.side_batches)
                print(f"  measured {backbone} {precision} side by side: " + ", ".join(
                    f"{r} {v['rate']:.1f} img/s ({v['vs_tf']:.2f}x), {v['cpu_ms']:.1f} CPU-ms/img ({v['cpu_vs_tf']:.2f}x)"
                    if isinstance(v, dict) else f"{r}: {v}" for r, v in side.items()), flush=True)
                for runtime in RUNTIMES:
                    if (precision not in args.pipeline_precisions or runtime not in args.pipeline_runtimes
                            or (runtime == "onnxruntime" and precision != "float32")):
                        if isinstance(side.get(runtime), dict):  # the side-by-side forward only
                            table.append({"backbone": f"{backbone} {size}", "precision": precision,
                                          "runtime": runtime, "failed": None, "side": side[runtime], "pipe": None})
                        continue
                    args.runtime = runtime
                    runs = [run_worker("pipeline", args, data=data, precision=precision) for _ in range(args.rounds)]
                    ok = [r for r in runs if "failed" not in r]
                    row = {"backbone": f"{backbone} {size}", "precision": precision, "runtime": runtime,
                           "failed": None if ok else runs[0]["failed"], "side": side.get(runtime)}
                    if ok:
                        row.update(bare=median(r["paired_rate"] for r in ok), pipe=median(r["rate"] for r in ok),
                                   ratio=median(r["rate"] / r["paired_rate"] for r in ok),
                                   ran=ok[0]["runtime"], cpu=median(r["paired_cpu_ms"] for r in ok),
                                   cpu_ratio=median(r["paired_cpu_ms"] / r["cpu_ms"] for r in ok),
                                   rounds=[round(r["rate"], 1) for r in ok])
                    table.append(row)
                    print(f"  measured {backbone} {precision} {runtime}: "
                          + (f"bare {row['bare']:.1f}, pipeline {row['pipe']:.1f} img/s {row['rounds']}" if ok
                             else f"failed: {row['failed']}"), flush=True)
        cosines = run_worker("cosine", args, data=tmp, cosine_size=args.cosine_size) if WEIGHTS.is_file() else None
    print(f"\nmachine: {machine()}")
    print("bare: the forward alone on random tensors; 'side by side' = every runtime in one process, batch after "
          "batch in turn (its ratio: median over turns); pipeline: extract_features on JPEG files, paired with "
          "bare batches in its own process (pipe/bare); pipe/TF: pipeline images/s over TensorFlow's (processes "
          "minutes apart)")
    print("CPU: CPU-ms per image (all threads), which the load of other processes hardly moves; on an idle "
          "machine whose cores the runtime keeps busy, images/s ratios approach the CPU ratios; CPU pipe/bare = "
          "the paired bare batches' CPU time per image over the pipeline's")
    print(f"{'backbone':22s} {'precision':9s} {'runtime':18s} {'side img/s':>10s} {'side/TF':>8s} {'CPU-ms':>7s} "
          f"{'CPU/TF':>7s} {'bare img/s':>10s} {'pipe img/s':>10s} {'pipe/TF':>8s} {'pipe/bare':>9s} {'CPU p/b':>8s}")
    for row in table:
        tf_row = next((r for r in table if r["backbone"] == row["backbone"] and r["precision"] == row["precision"]
                       and r["runtime"] == "tensorflow" and not r["failed"]), None)
        name = row["runtime"] + (" (auto)" if auto[row["precision"]][0] == row["runtime"] else "")
        side = row["side"] if isinstance(row["side"], dict) else None
        side_text = (f"{side['rate']:10.1f} {side['vs_tf']:7.2f}x {side['cpu_ms']:7.1f} {side['cpu_vs_tf']:6.2f}x" if side
                     else f"{'-':>10s} {'-':>8s} {'-':>7s} {'-':>7s}")
        if row["failed"]:
            print(f"{row['backbone']:22s} {row['precision']:9s} {name:18s} {side_text} failed: {row['failed']}")
            continue
        if row["pipe"] is None:
            print(f"{row['backbone']:22s} {row['precision']:9s} {name:18s} {side_text}")
            continue
        vs = f"{row['pipe'] / tf_row['pipe']:7.2f}x" if tf_row and tf_row.get("pipe") else f"{'-':>8s}"
        print(f"{row['backbone']:22s} {row['precision']:9s} {name:18s} {side_text} {row['bare']:10.1f} "
              f"{row['pipe']:10.1f} {vs} {row['ratio']:9.3f} {row['cpu_ratio']:8.3f}"
              + ("" if row["ran"] == row["runtime"] else f"  (ran on {row['ran']})"))
    for size, p in prep.items():
        print(f"preparation alone at {size} px (decode, augmentation, batching; no model): {p['cpu_ms']:.1f} CPU-ms "
              f"and {p['wall_ms']:.1f} ms per image-pass")
    print("targets at float32: auto >= 1.5x TensorFlow on xception, >= 3x on mobilenet_v2, >= 5x on convnext_tiny "
          "(pipe/TF of the auto row); pipe/bare >= 0.95")
    if cosines:
        print(f"\nper-image cosine to TensorFlow float32 features, real MobileNetV2 ({WEIGHTS.name}) at "
              f"{args.cosine_size} px on {next(iter(v for v in cosines.values() if isinstance(v, dict)))['images']} "
              "real photos (target >= 0.9999 at float32):")
        for name, c in cosines.items():
            print(f"  {name:24s} " + (f"min {c['cosine_min']:.6f}  median {c['cosine_median']:.6f}  largest "
                                      f"relative difference {c['relative']:.2e}  (ran on {c['runtime']} in "
                                      f"{c['precision']})" if isinstance(c, dict) else f"refused: {c}"))
    else:
        print(f"(no per-image cosine on real weights: {WEIGHTS} is not here)")


def make_subset(source: Path, target: Path, n: int) -> None:
    """A Kaggle-layout folder with `n` images of `source` taken from every class in turn (labels.csv
    lists them class by class, and one class is not a classifier's data), as links, not copies."""
    import pandas as pd

    labels = pd.read_csv(source / "labels.csv")
    labels = labels.iloc[labels.groupby("breed").cumcount().argsort(kind="stable")].head(n)
    (target / "train").mkdir(parents=True)
    for image_id in labels["id"]:
        os.symlink(source / "train" / f"{image_id}.jpg", target / "train" / f"{image_id}.jpg")
    labels.to_csv(target / "labels.csv", index=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run (resnet50, 64 px, few images)")
    parser.add_argument("--precision-study", action="store_true", help="issue 13's precision study instead")
    parser.add_argument("--backbones", nargs="+", default=[b for b, _, _ in STUDY],
                        help="runtime study: backbones (sizes and image counts as STUDY)")
    parser.add_argument("--runtime-precisions", nargs="+", default=["float32", "auto"])
    parser.add_argument("--pipeline-precisions", nargs="+", default=["float32"],
                        help="precisions whose pipeline is run (the others: the side-by-side forward only)")
    parser.add_argument("--pipeline-runtimes", nargs="+", default=list(RUNTIMES),
                        help="runtimes whose pipeline is run (the others: the side-by-side forward only; a "
                             "runtime's pipeline on another model than the bare forward's converts it again)")
    parser.add_argument("--cosine-size", type=int, default=224)
    parser.add_argument("--side-batches", type=int, default=6, help="turns of the side-by-side bare forward")
    parser.add_argument("--keep-going", action="store_true", default=True, help=argparse.SUPPRESS)
    parser.add_argument("--runtime", default="tensorflow", help=argparse.SUPPRESS)
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
    parser.add_argument("--worker", choices=["bare", "pipeline", "prep", "cosine", "side"], help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--how", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.worker == "cosine":
            args.image_size = args.cosine_size
        result = {"bare": worker_bare, "pipeline": worker_pipeline, "prep": worker_prep,
                  "cosine": worker_cosine, "side": worker_side_by_side}[args.worker](args)
        print(json.dumps(result))
        return
    if not args.precision_study:
        args.study = [row for row in STUDY if row[0] in args.backbones]
        if args.quick:
            args.study, args.rounds, args.cosine_size, args.side_batches = [("mobilenet_v2", 96, 128)], 1, 96, 3
        runtime_study(args)
        return
    args.keep_going = False
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
