"""The fused sweep's epoch with Keras's maths against the hand-written maths it replaced.

`dogtl.sweeps.fused` trains each trial of a group with its own Keras head and optimizer inside
one graph. Until commit HANDWRITTEN it stacked the trials' weights ([T, in, out]) and ran
hand-written BatchNorm, dropout, optimizer and schedule maths with batched matmuls. This times
both, side by side in one process, at bench_sweep.py's shapes: 8 trials (its max_lr x dropout
space), 2,048-d float16 features of 1 clean + 5 augmented passes, hidden 1,024, 120 classes,
batch 128. Printed: the group's setup (model builds and tracing) and first epoch (which
compiles), then the best of the following epochs, each with validation, and the ratios.

    python benchmarks/bench_fused.py                # ~8,200 training rows, 3 epochs each
    python benchmarks/bench_fused.py --rows 2000 --epochs 2
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HANDWRITTEN = "da69aaa"  # the last commit with the hand-written fused maths
SPACE = [dict(max_lr=m, dropout=d) for m in (5e-4, 1e-3, 2e-3, 4e-3) for d in (0.3, 0.5)]


def handwritten_module(rev: str):
    """`dogtl.sweeps.fused` as it was at `rev`, loaded from git under another name."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{rev}:src/dogtl/sweeps/fused.py"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("fused_handwritten", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    exec(compile(source, f"{rev}:fused.py", "exec"), module.__dict__)
    return module


def time_group(module, configs, data, epochs: int) -> tuple[float, float, float]:
    """(setup seconds, first epoch seconds, best later epoch seconds) of one fused group."""
    features, labels, train_rows, val_x, classes = data
    started = time.perf_counter()
    group = module.FusedHeads(configs, features, labels, train_rows, val_x, classes)
    setup = time.perf_counter() - started
    times = []
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        group.run_epoch(epoch)
        group.predict_val()
        times.append(time.perf_counter() - started)
    return setup, times[0], min(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8256, help="training rows (default 8,256: 64 steps of 128)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per implementation (at least 2)")
    parser.add_argument("--against", default=HANDWRITTEN, help="git revision of the hand-written fused.py")
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf

    from dogtl.head.settings import HeadConfig
    from dogtl.sweeps import fused as keras_fused

    rng = np.random.default_rng(0)
    dim, classes, passes, val = 2048, 120, 6, 920
    n = args.rows + val
    labels = rng.integers(0, classes, n).astype(np.int32)
    centres = rng.standard_normal((classes, dim)).astype(np.float32)
    features = tf.convert_to_tensor(
        (centres[labels][None] * 0.3 + rng.standard_normal((passes, n, dim), np.float32)).astype(np.float16))
    train_rows, val_rows = np.arange(args.rows), np.arange(args.rows, n)
    val_x = features[0].numpy()[val_rows].astype(np.float32)
    data = (features, labels, train_rows, val_x, classes)
    configs = [HeadConfig(batch_size=128, hidden=(1024,), epochs=args.epochs, patience=0, seed=i, **trial)
               for i, trial in enumerate(SPACE)]
    resolved = configs[0].resolve(args.rows)
    print(f"{len(configs)} trials, {args.rows} training rows x {passes} passes x {dim} features (float16), "
          f"hidden 1024, {classes} classes, batch 128 ({resolved.steps_per_epoch} steps), "
          f"precision {resolved.precision}; {tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()}"
          " threads")
    contenders = {"hand-written maths": handwritten_module(args.against), "Keras maths": keras_fused}
    results = {}
    for name, module in contenders.items():
        results[name] = time_group(module, configs, data, args.epochs)
        setup, first, best = results[name]
        print(f"{name}: setup {setup:.2f} s, first epoch {first:.2f} s, best later epoch {best:.2f} s")
    (s0, f0, b0), (s1, f1, b1) = results.values()
    sweep = lambda s, f, b: s + f + (20 - 1) * b  # noqa: E731 - a 20-epoch group, as bench_sweep trains
    print(f"Keras / hand-written: epoch {b1 / b0:.3f}, setup + first epoch {(s1 + f1) / (s0 + f0):.3f}, "
          f"20-epoch group {sweep(s1, f1, b1) / sweep(s0, f0, b0):.3f}")


if __name__ == "__main__":
    sys.exit(main())
