"""How long the reference recipe takes on this machine: rates measured here, extrapolated.

The recipe is the defaults on Kaggle's Dog Breed Identification data: 10,222 labelled images
(9,200 train, 1,022 validation) and 10,357 test images; `extract-features` runs Xception at
299 px over 1 clean + 5 augmented passes of the labelled images and 1 pass of the test images;
`train-head` trains at most 50 epochs (early stopping usually ends it sooner); `finetune` trains
the top 2 blocks for at most 10 epochs at batch 16, validating on the clean images after each.

Measured through dogtl's own stage functions on generated JPEGs of Kaggle-like size (400 px),
with a randomly initialised backbone (the same arithmetic as ImageNet weights, no download), at
the default `--precision auto`:
  extract   images/s of extract-features (decode, augment, backbone, crash-safe batches),
            steady state: from the end of its first batch (which traces the model) to its last;
  head      seconds per train-head epoch on a synthetic cache of the recipe's size
            (10,222 x 2,048 features x 6 passes, 120 classes);
  finetune  training images/s within fine-tuning epochs after the first, and the time after
            each epoch's training (validation on clean images, at the extraction rate, and a
            checkpoint, counted as a fixed cost per epoch).
Then prints each stage's estimate for the recipe. Run it on the machine you want to estimate
(a GPU box: the rates it measures there are the GPU's):

    python benchmarks/recipe_time.py                 # 128 images, ~5 minutes on 2 CPU cores
    python benchmarks/recipe_time.py --images 512    # a GPU: more images, steadier rates
    python benchmarks/recipe_time.py --quick         # smoke run of this script (mobilenet_v2, 32 images)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

RECIPE = {"labelled": 10_222, "train": 9_200, "val": 1_022, "test": 10_357, "passes": 5, "classes": 120,
          "head_epochs": 50, "finetune_epochs": 10}


class Marks:
    """Progress events with their times: (seconds, done)."""

    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append((time.perf_counter(), event.done))

    def __getitem__(self, i):
        return self.events[i]

    def __len__(self):
        return len(self.events)

    def __bool__(self):  # a progress callback, even before its first event
        return True


def measure_extraction(root: Path, args) -> float:
    """Seconds per image pass, from the end of the first batch (which traces the model) to the last."""
    import dogtl

    marks = Marks()
    dogtl.extract_features(data=root / "data", cache=root / "cache/features.h5", backbone=args.backbone,
                           weights="none", passes=1, batch_size=32, dtype="float32", progress=marks)
    (t0, d0), (t1, d1) = marks[0], marks[-1]
    return (t1 - t0) / (d1 - d0)


def measure_head() -> float:
    """Seconds per epoch on a cache of the recipe's size, epochs after the first (which traces)."""
    import dogtl
    from dogtl.features.synthetic import write_feature_cache

    with tempfile.TemporaryDirectory() as tmp:
        cache = write_feature_cache(Path(tmp) / "recipe.h5", num_images=RECIPE["labelled"],
                                    num_classes=RECIPE["classes"], dim=2048, passes=RECIPE["passes"],
                                    val_fraction=0.1, dtype="float16")
        marks = Marks()
        dogtl.train_head(cache=cache, out=Path(tmp) / "head.keras", epochs=4, patience=0,
                         progress=marks)
    (t0, e0), (t1, e1) = marks[0], marks[-1]
    return (t1 - t0) / (e1 - e0)


def measure_finetune(root: Path, args) -> tuple[float, float]:
    """Seconds (per training image, per epoch after its training steps: validation and checkpoint),
    medians over the epochs after the first (which traces)."""
    import dogtl

    dogtl.train_head(cache=root / "cache/features.h5", out=root / "models/head.keras", epochs=1, progress=False)
    batches, ends = Marks(), []
    dogtl.finetune(data=root / "data", head=root / "models/head.keras", out=root / "models/finetuned.keras",
                   epochs=args.epochs, patience=0, progress=lambda e: batches(e) if e.unit == "images" else
                   ends.append(time.perf_counter()))
    per_epoch = len(batches) // args.epochs  # batch events per epoch
    train, after = [], []
    for e in range(1, args.epochs):  # epoch e's training starts when epoch e - 1's validation ends
        done_before = batches[e * per_epoch - 1][1]
        last, done = batches[(e + 1) * per_epoch - 1]
        train.append((last - ends[e - 1]) / (done - done_before))
        after.append(ends[e] - last)
    return statistics.median(train), statistics.median(after)


def duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=128, help="generated training images (4 classes)")
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (the first is not timed)")
    parser.add_argument("--backbone", default="xception")
    parser.add_argument("--quick", action="store_true", help="smoke run: mobilenet_v2, 32 images, 2 epochs")
    args = parser.parse_args()
    if args.quick:
        args.backbone, args.images, args.epochs = "mobilenet_v2", 32, 2

    from dogtl.data.synthetic import make_kaggle_dataset
    from dogtl.features.cache import open_cache

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_kaggle_dataset(root / "data", num_classes=4, per_class=args.images // 4, test_images=0, size=400)
        forward = measure_extraction(root, args)
        train_image, after_epoch = measure_finetune(root, args)
        measured_val = int(open_cache(root / "cache/features.h5").is_val.sum())
    head_epoch = measure_head()

    r = RECIPE
    passes = r["labelled"] * (1 + r["passes"]) + r["test"]
    # after an epoch's training steps: validation (a clean forward per image, as in extraction)
    # and a checkpoint, counted as a fixed cost
    checkpoint = max(0.0, after_epoch - forward * measured_val)
    finetune_epoch = train_image * r["train"] + forward * r["val"] + checkpoint
    load = os.getloadavg()
    print(f"measured: {args.backbone} at its default size, --precision auto, {args.images} generated images, "
          f"{os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    if load[0] > os.cpu_count():
        print("  (other work is running on this machine: the times below are longer than it alone would take)")
    print(f"  extract-features  {1 / forward:6.2f} images/s")
    print(f"  train-head        {head_epoch:6.2f} s per epoch ({r['labelled']:,} x 2,048 features x {1 + r['passes']} passes)")
    print(f"  finetune          {1 / train_image:6.2f} training images/s; after each epoch {after_epoch:.1f} s to "
          f"validate {measured_val} images and checkpoint ({checkpoint:.1f} s of it beyond the forward passes)")
    print("estimate for the recipe (Kaggle Dog Breed Identification, defaults):")
    for name, what, seconds in [
            ("extract-features", f"{passes:,} image passes ({r['labelled']:,} x {1 + r['passes']} + {r['test']:,} test)",
             forward * passes),
            ("train-head", f"at most {r['head_epochs']} epochs", head_epoch * r["head_epochs"]),
            ("finetune", f"at most {r['finetune_epochs']} epochs of {duration(finetune_epoch)}",
             finetune_epoch * r["finetune_epochs"]),
            ("predict", f"{r['test']:,} test images with the fine-tuned model", forward * r["test"])]:
        print(f"  {name:16s}  {duration(seconds):>7s}  {what}")


if __name__ == "__main__":
    main()
