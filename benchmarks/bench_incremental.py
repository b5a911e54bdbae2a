"""Incremental extraction: adding 5% new images to a cache against extracting it in full (issue 23).

In one run, in one process, on synthetic JPEGs (`dogtl.data.synthetic`) at the model's input size:
  full     `extract.extract_features` over N images (the cache to update);
  update   the same command after N * --added new images joined the data folder (spread through
           labels.csv): the cache is updated, computing only the new images;
  fresh    a fresh extraction of the new image list, the reference the updated cache must equal
           row for row: ids, labels, split, augmentation keys, file contents, and every pass's
           features bit for bit.
Each is timed whole, as a user waits for it (data folder read and hashed, model built and
traced, the backbone, the HDF5 file written), wall clock and this process's CPU time (all
threads; steadier than wall clock on a shared machine). Target: update <= 10% of full.

    python benchmarks/bench_incremental.py           # mobilenet_v2 at 224 px, 2,000 + 100 images, 2 augmented passes
    python benchmarks/bench_incremental.py --quick   # smoke run: resnet50 at 32 px, 200 + 10 images, seconds
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REAL_WEIGHTS = Path("/work/shared/weights/mobilenet_v2_stanford_dogs.weights.h5")


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def make_data(root: Path, n: int, added: int, size: int) -> tuple[Path, Path]:
    """Two Kaggle-layout folders sharing one train/: `before` lists n images, `after` the same
    plus `added` more, spread evenly through labels.csv."""
    import pandas as pd

    from dogtl.data.synthetic import make_kaggle_dataset

    after = make_kaggle_dataset(root / "after", num_classes=10, per_class=-(-(n + added) // 10), test_images=0,
                                size=size, seed=0, sample_submission=False)
    table = pd.read_csv(after / "labels.csv", dtype=str).iloc[:n + added]
    table.to_csv(after / "labels.csv", index=False)
    new = set(range(0, n + added, (n + added) // added)[:added])
    before = root / "before"
    before.mkdir()
    (before / "train").symlink_to(after / "train")
    table[[i not in new for i in range(len(table))]].to_csv(before / "labels.csv", index=False)
    return before, after


def timed(run):
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = run()
    return result, time.perf_counter() - wall, cpu_seconds() - cpu


def same_cache(a: Path, b: Path) -> list[str]:
    """What differs between two caches' rows (empty: equal row for row, features bit for bit)."""
    import numpy as np

    from dogtl.features.cache import open_cache

    x, y = open_cache(a), open_cache(b)
    problems = [] if x.fingerprint == y.fingerprint else ["fingerprint"]
    for name in ("classes", "skipped"):
        if getattr(x, name) != getattr(y, name):
            problems.append(name)
    for name in ("labels", "is_val"):
        if not np.array_equal(getattr(x, name), getattr(y, name)):
            problems.append(name)
    for split in ("labelled", "test"):
        for name in ("ids", "index", "key", "sha256"):
            if not np.array_equal(x.column(split, name), y.column(split, name)):
                problems.append(f"{split}/{name}")
        passes = x.num_passes if split == "labelled" else x.num_test_passes
        for p in range(passes):  # raw stored values (float16 bits), one pass at a time
            if not np.array_equal(x.read_rows(split, p, np.arange(len(x.ids if split == "labelled" else x.test_ids))),
                                  y.read_rows(split, p, np.arange(len(y.ids if split == "labelled" else y.test_ids)))):
                problems.append(f"{split} features pass {p}")
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run (resnet50, 32 px, 200 + 10 images)")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--weights", default=str(REAL_WEIGHTS) if REAL_WEIGHTS.exists() else "none",
                        help="backbone weights (default: the real mobilenet_v2 file when present, else none)")
    parser.add_argument("--images", type=int, default=2000, help="images in the cache to update")
    parser.add_argument("--added", type=float, default=0.05, help="new images, as a fraction of --images")
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    if args.quick:
        args.backbone, args.image_size, args.weights, args.images, args.batch_size = "resnet50", 32, "none", 200, 16
    if args.backbone != "mobilenet_v2" and args.weights == str(REAL_WEIGHTS):
        args.weights = "none"
    dtype = "float16" if args.weights != "none" or args.backbone != "mobilenet_v2" else "float32"  # random mobilenet: ~1e-12

    from dogtl.core.precision import resolve
    from dogtl.features.extract import extract_features
    from dogtl.features.settings import ExtractConfig

    added = max(1, round(args.images * args.added))
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    print(f"machine: {model}, {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} at start")
    print(f"setting: {args.backbone} at {args.image_size} px, weights {Path(args.weights).name}, "
          f"precision {args.precision} -> {resolve(args.precision)}, 1 clean + {args.passes} augmented passes, "
          f"batch {args.batch_size}, stored {dtype}")
    with tempfile.TemporaryDirectory(prefix="bench_incremental_") as tmp:
        tmp = Path(tmp)
        before, after = make_data(tmp, args.images, added, args.image_size)

        def extract(data, cache, notes=None):
            config = ExtractConfig(data=str(data), cache=str(cache), backbone=args.backbone, weights=args.weights,
                                   image_size=args.image_size, passes=args.passes, batch_size=args.batch_size,
                                   dtype=dtype, precision=args.precision)
            return extract_features(config, note=notes.append if notes is not None else None)

        full, full_wall, full_cpu = timed(lambda: extract(before, tmp / "full.h5"))
        print(f"full extraction of {full.images} images:      {full_wall:7.1f} s wall, {full_cpu:7.1f} s CPU")
        shutil.copy(tmp / "full.h5", tmp / "updated.h5")
        if args.weights == "none":  # the random backbone is calibrated on the images: every run uses full's
            from dogtl.features.random_backbone import random_backbone_path

            for name in ("updated", "fresh"):
                shutil.copy(random_backbone_path(tmp / "full.h5"), random_backbone_path(tmp / f"{name}.h5"))
        notes = []
        update, update_wall, update_cpu = timed(lambda: extract(after, tmp / "updated.h5", notes))
        print(f"update adding {added} images ({added / args.images:.0%}):     {update_wall:7.1f} s wall, "
              f"{update_cpu:7.1f} s CPU; it printed: {notes[0]!r}; {update.computed} images computed")
        print(f"  update / full: {update_wall / full_wall:.3f} wall, {update_cpu / full_cpu:.3f} CPU "
              f"(target <= 0.10; the images alone are {added / args.images:.3f})")
        fresh, fresh_wall, fresh_cpu = timed(lambda: extract(after, tmp / "fresh.h5"))
        print(f"fresh extraction of {fresh.images} images:     {fresh_wall:7.1f} s wall, {fresh_cpu:7.1f} s CPU "
              f"(update / fresh: {update_wall / fresh_wall:.3f} wall)")
        problems = same_cache(tmp / "updated.h5", tmp / "fresh.h5")
        print(f"updated cache == fresh extraction of the new list, row for row ({update.images} rows: ids, labels, "
              f"split, keys, contents, {1 + args.passes} passes of features bit for bit): "
              + ("yes" if not problems else f"NO, differs in {', '.join(problems)}"))
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
