"""Sweep speed: 16 head trainings of 20 epochs, `dogtl sweep` against `dogtl train-head` run 16 times.

On a synthetic cache of Kaggle dog-breed size (9,174 x 2,048 features, 120 classes, 1 clean +
5 augmented passes, float16, as the stage-two benchmark), measured in one run on the same
machine, every contender a fresh process as a user would run it:
  - baseline: `dogtl train-head --config trial.toml` for each of the 16 trials, one after another;
  - `dogtl sweep --fuse 1`: one process, cache read once, trials trained one at a time (fit_head);
  - `dogtl sweep` (default --fuse 8): trials trained side by side in one graph;
  - `dogtl sweep --jobs 2`: two workers, one TensorFlow thread each.
Every trial runs all its epochs (patience 0), so all contenders do the same work. Also printed:
the compute floor, the trials' multiply-adds (training 3x forward, plus validation) divided by
the float32 matmul rate measured here (a large square matmul on every core).
Absolute times are noisy on a shared machine; ratios are measured side by side.

    python benchmarks/bench_sweep.py            # full size (~15-25 minutes on 2 cores)
    python benchmarks/bench_sweep.py --quick    # reduced smoke run (~2 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# 16 trials sharing hidden layers, batch size and optimizer (what a learning-rate/dropout sweep is).
FULL_SPACE = ["max_lr=5e-4,1e-3,2e-3,4e-3", "dropout=0.3,0.5", "input_dropout=0.25,0.5", "patience=0"]
QUICK_SPACE = ["max_lr=1e-3,4e-3", "dropout=0.3,0.5", "patience=0"]


def best_seconds_in_fresh_process(setup: str, timed: str, seconds: float) -> float:
    """Best wall time of the statements `timed` (their last line an expression of tensors), after
    `setup`, repeated for `seconds` in a fresh TensorFlow process."""
    code = f"""
import os, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf
{setup}
def once():
{textwrap.indent(timed, "    ")}
def run():
    r = once(); [v.numpy() for v in (r if isinstance(r, (list, tuple)) else [r])]
run()
best, end = 1e9, time.perf_counter() + {seconds}
while time.perf_counter() < end:
    t = time.perf_counter(); run(); best = min(best, time.perf_counter() - t)
print(best)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def matmul_rate(seconds: float = 3.0, n: int = 2048) -> float:
    """Best float32 multiply-adds per second of an n x n x n matmul on every core."""
    setup = f"""a = tf.random.normal([{n}, {n}]); b = tf.random.normal([{n}, {n}])
f = tf.function(lambda a, b: tf.reduce_sum(tf.matmul(a, b)))"""
    return n ** 3 / best_seconds_in_fresh_process(setup, "return f(a, b)", seconds)


def kernels_alone(trials: int, batch: int, dim: int, hidden: int, precision: str, seconds: float = 2.0) -> float:
    """Seconds per training step of `trials` heads fused, for the work no implementation can skip:
    the first hidden layer's three matmuls (forward, kernel gradient, input gradient, which
    BatchNorm's scale and offset need) in the trials' precision, and the RMSprop update of its
    kernel (XLA-fused, as dogtl runs it). Each timed alone."""
    setup = f"""T, B, D, H = {trials}, {batch}, {dim}, {hidden}
dt = tf.bfloat16 if "{precision}" == "bfloat16" else tf.float32
x, w, dh = (tf.cast(tf.random.normal(s), dt) for s in ([T, B, D], [T, D, H], [T, B, H]))
matmuls = tf.function(lambda: [tf.reduce_sum(y[:, :1]) for y in (
    tf.matmul(x, w), tf.matmul(x, dh, transpose_a=True), tf.matmul(dh, w, transpose_b=True))])
kernel, velocity = tf.Variable(tf.random.normal([T, D, H])), tf.Variable(tf.zeros([T, D, H]))
grad = tf.random.normal([T, D, H])
@tf.function(jit_compile=True)
def update(grad):
    velocity.assign(0.9 * velocity + 0.1 * tf.square(grad))
    kernel.assign_sub(1e-3 * grad / tf.sqrt(velocity + 1e-7))
    return kernel[0, 0, 0]"""
    return (best_seconds_in_fresh_process(setup, "return matmuls()", seconds)
            + best_seconds_in_fresh_process(setup, "return update(grad)", seconds))


def dogtl(*args) -> float:
    """Run `dogtl ARGS` in a fresh process; its wall time in seconds."""
    t = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "dogtl.cli", *map(str, args)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"dogtl {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return time.perf_counter() - t


def sweep_runs(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "trials").glob("*.json"))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced sizes: a smoke test of this script")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per trial (default 20, quick 3)")
    parser.add_argument("--skip-baseline", action="store_true", help="do not run train-head 16 times")
    parser.add_argument("--contenders", default="fuse1,fused,jobs2",
                        help="comma-separated sweep variants to time: fuse1, fused, jobs2")
    args = parser.parse_args()

    from dogtl.head.settings import HeadConfig
    from dogtl.sweeps.results import write_best_config
    from dogtl.sweeps.settings import DEFAULT_FUSE
    from dogtl.features.synthetic import write_feature_cache

    if args.quick:
        n, dim, classes, passes, space, epochs = 600, 256, 20, 5, QUICK_SPACE, args.epochs or 3
    else:
        n, dim, classes, passes, space, epochs = 9174, 2048, 120, 5, FULL_SPACE, args.epochs or 20
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    variants = {"fuse1": ["--fuse", "1"], "fused": [], "jobs2": ["--jobs", "2"]}
    names = {"fuse1": "dogtl sweep --fuse 1 (one process, one trial at a time)",
             "fused": "dogtl sweep (trials fused, default --fuse 8)",
             "jobs2": "dogtl sweep --jobs 2 (trials fused, 2 workers x 1 thread)"}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        cache = write_feature_cache(tmp / "features.h5", num_images=n, num_classes=classes, dim=dim, passes=passes,
                                    val_fraction=0.1, dtype="float16", separation=0.3)
        print(f"synthetic cache: {n} x {dim} features, {classes} classes, 1 clean + {passes} augmented passes, "
              f"float16; written in {time.perf_counter() - t:.1f} s")
        rate = matmul_rate()
        print(f"float32 matmul rate: {rate / 1e9:.1f} GMAC/s (2048^3, every core, best of 3 s)")
        params = [a for p in space for a in ("--param", p)]
        print(f"sweep: {' '.join(params)} --epochs {epochs}")

        times, runs = {}, None
        for name in contenders:
            out = tmp / f"sweep-{name}"
            times[name] = dogtl("sweep", "--cache", cache, *params, "--epochs", epochs, "--out", out,
                                *variants[name])
            runs = sweep_runs(out)
            fused = sum(r["fused"] for r in runs)
            best = min(r["metrics"]["val_log_loss"] for r in runs)
            print(f"{names[name]}: {len(runs)} trials x {epochs} epochs in {times[name]:.1f} s = "
                  f"{60 * len(runs) / times[name]:.1f} trials/min ({fused} fused; best val log loss {best:.3g})")
        if runs is None:  # nothing timed: expand the trials with a zero-epoch dry listing
            raise SystemExit("give at least one contender")
        trials = len(runs)
        macs = sum(r["macs"] for r in runs)
        floor = macs / rate
        print(f"compute floor: {macs / 1e12:.2f} T multiply-adds / {rate / 1e9:.1f} GMAC/s = {floor:.1f} s")
        trial_configs = [HeadConfig(**r["settings"]) for r in runs]
        resolved = [c.resolve(r["train_images"]) for c, r in zip(trial_configs, runs)]
        fuse = min(DEFAULT_FUSE, trials)
        per_step = kernels_alone(fuse, resolved[0].batch_size, dim, trial_configs[0].hidden[0],
                                 resolved[0].precision)
        trial_steps = sum(r.steps_per_epoch * epochs for r in resolved)
        kernel_floor = per_step / fuse * trial_steps
        print(f"kernels alone: the first hidden layer's 3 matmuls ({resolved[0].precision}) and RMSprop kernel "
              f"update, timed alone in the fused shapes: {1000 * per_step:.1f} ms per step of {fuse} trials "
              f"(batch {resolved[0].batch_size}) -> {kernel_floor:.1f} s for these trials")

        baseline = None
        if not args.skip_baseline:
            configs = tmp / "configs"
            configs.mkdir()
            t = time.perf_counter()
            for i, r in enumerate(runs):
                settings = {**r["settings"], "cache": str(cache)}
                write_best_config(settings, configs / f"trial{i}.toml")
                dogtl("train-head", "--config", configs / f"trial{i}.toml", "--out", tmp / f"head{i}.keras")
            baseline = time.perf_counter() - t
            print(f"baseline, dogtl train-head x {trials} one after another: {baseline:.1f} s = "
                  f"{60 * trials / baseline:.1f} trials/min")
        for name in contenders:
            line = f"{names[name]}: {times[name] / floor:.2f}x the compute floor"
            if baseline:
                line += f", {baseline / times[name]:.2f}x faster than the baseline (target >= 3x)"
            print(line)
        if baseline:
            print(f"baseline: {baseline / floor:.2f}x the compute floor, so 3x faster than it means "
                  f"{baseline / 3 / floor:.2f}x the compute floor: {baseline / 3:.1f} s for everything, "
                  f"of which the kernels alone take {kernel_floor:.1f} s ({100 * kernel_floor / (baseline / 3):.0f}%)")
        best_name = min(times, key=times.get)
        print(f"fastest: {names[best_name]} at {times[best_name] / floor:.2f}x the compute floor (target <= 2x)")


if __name__ == "__main__":
    main()
