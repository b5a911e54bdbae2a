"""tf.data's autotuner and the stall after a finished pass: autotune on against off, side by side.

With tf.data's autotuner on, deleting an iterator that a model had consumed to its end kept the
process idle (every CPU) for ~5 s in about half the runs (TensorFlow 2.21, 2 cores): a fixed
5 s added to every extraction, prediction from images and fine-tuning epoch's validation. dogtl
turns the autotuner off in its image pipelines (`dogtl.data.images.without_autotune`).

In one process, rounds alternating the two settings, each a whole `extract_features` into a new
cache (synthetic JPEGs at the model's size, 1 clean + --passes augmented passes, a fixed random
backbone on --runtime), timed wall clock and CPU: a stall shows as a run whose wall time is far
above its CPU time over the cores. "on" is tf.data's default (`without_autotune` made the
identity), "off" is dogtl's. Target: off never stalls, and is as fast as on without a stall.

    python benchmarks/bench_iterator_stall.py           # mobilenet_v2 at 224 px, 1,000 images x 3 passes, 8 rounds each (~2 min)
    python benchmarks/bench_iterator_stall.py --quick   # smoke run: 96 px, 64 images, 2 rounds each
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench_incremental import timed  # wall clock and this process's CPU time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=8, help="rounds of each setting")
    parser.add_argument("--passes", type=int, default=2, help="augmented passes on top of the clean one")
    parser.add_argument("--runtime", default="auto")
    args = parser.parse_args()
    if args.quick:
        args.image_size, args.images, args.rounds, args.passes = 96, 64, 2, 1

    import dogtl.data.images as images
    from dogtl.core.backbones import get_backbone
    from dogtl.data.folders import load_dataset
    from dogtl.data.synthetic import make_kaggle_dataset
    from dogtl.features.extract import extract_features
    from dogtl.features.random_backbone import calibrate_random_backbone
    from dogtl.features.settings import ExtractConfig

    work = Path(tempfile.mkdtemp(prefix="stall_"))
    spec = get_backbone(args.backbone)
    data = make_kaggle_dataset(work / "data", num_classes=4, per_class=-(-args.images // 4), test_images=0,
                               size=args.image_size, seed=0, sample_submission=False)
    weights = work / "random.weights.h5"  # --weights none's backbone, made once: no calibration in the timed runs
    calibrate_random_backbone(spec, args.image_size, load_dataset(str(data)).paths, weights, what="the benchmark")
    with_autotune_off = images.without_autotune

    def extraction(k: int, on: bool) -> tuple[float, float, str]:
        images.without_autotune = (lambda ds: ds) if on else with_autotune_off  # on: tf.data's default
        config = ExtractConfig(data=str(data), cache=str(work / f"cache{k}.h5"), backbone=spec.name,
                               weights=str(weights), image_size=args.image_size, passes=args.passes,
                               runtime=args.runtime)
        summary, wall, cpu = timed(lambda: extract_features(config))
        return wall, cpu, summary.runtime

    _, _, runtime = extraction(0, False)  # converts the backbone (once), traces the pipeline: not timed
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; {spec.name} at "
          f"{args.image_size} px on {runtime}, {args.images} images x {1 + args.passes} passes")
    results = {True: [], False: []}
    for r in range(args.rounds):
        for on in (True, False):
            wall, cpu, _ = extraction(len(results[True]) + len(results[False]) + 1, on)
            results[on].append(wall)
            gc.collect()  # the run's pipeline and forward freed before the next one, as between commands
            print(f"  round {r + 1} autotune {'on ' if on else 'off'}: {wall:5.2f} s wall, {cpu:5.2f} s CPU "
                  f"({cpu / wall:.2f} cores busy)", flush=True)
    print(f"{'autotune':9s} {'median s':>9s} {'max s':>7s} {'total s':>8s}")
    for on in (True, False):
        print(f"{'on' if on else 'off':9s} {statistics.median(results[on]):9.2f} {max(results[on]):7.2f} "
              f"{sum(results[on]):8.1f}")
    print(f"total wall, off / on: {sum(results[False]) / sum(results[True]):.3f}; load average at end "
          f"{os.getloadavg()[0]:.2f}")
    shutil.rmtree(work)


if __name__ == "__main__":
    sys.exit(main())
