"""Quality on real images with the real pretrained backbone: what each quality feature buys.

Real images nobody on the project drew: scikit-learn's digits (1,797 8x8 images, 10 classes)
upscaled to 128 px JPEGs in the Kaggle layout. The real pretrained backbone: MobileNetV2
fine-tuned on the Stanford Dogs (`../shared/weights/mobilenet_v2_stanford_dogs.weights.h5`,
see its README). Two caches of the same images, one split (seed 2018, 20% validation),
clean + 2 augmented passes each (label-preserving for digits: rotation 10, zoom 0.1, shift 0.1,
no flips): mobilenet_v2 at 96 px (A) and at 128 px (B).

In one run it prints validation accuracy, log loss and seconds for
  - the default head (`dogtl train-head`);
  - the linear head (`--hidden none`);
  - two caches concatenated (`--cache A --cache B`), default and linear head;
  - the top-5 ensemble of a 24-trial random sweep over --auto's space on the cache's validation split
    (`sweep --ensemble 5`), beside its best single trial;
  - TTA (`evaluate --tta`) of the default head, the linear head and the sweep ensemble;
  - the one-command path (`train-head --auto --budget 120`), on A, and on A + B.
The machine is shared: seconds are inflated and noisy; extraction is done once and reused.

    python benchmarks/quality.py [--work DIR] [--budget 120] [--weights PATH]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE.parent.parent / "shared" / "weights" / "mobilenet_v2_stanford_dogs.weights.h5"
# Label-preserving augmentation for digits: no mirror images, small rotations (the dog recipe's
# hflip and 45 degree rotations turn digits into other digits, and TTA over such views hurts).
AUGMENTATION = dict(rotation=10.0, zoom=0.1, shift=0.1, hflip=False)


def digits_dataset(root: Path, size: int = 128) -> Path:
    """sklearn's digits as Kaggle-layout JPEGs (labels.csv, train/<id>.jpg), upscaled to `size` px."""
    import csv

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    if (root / "labels.csv").exists():
        return root
    digits = load_digits()
    (root / "train").mkdir(parents=True, exist_ok=True)
    rows = [("id", "breed")]
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        pixels = (255 - image * (255 / 16)).astype(np.uint8)  # dark digits on white, like photos' contrast
        Image.fromarray(pixels).convert("RGB").resize((size, size), Image.BICUBIC).save(
            root / "train" / f"d{i:05d}.jpg", quality=95)
        rows.append((f"d{i:05d}", f"digit_{label}"))
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/dogtl-quality"))
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--budget", type=float, default=120.0)
    parser.add_argument("--trials", type=int, default=24)
    args = parser.parse_args()
    if not args.weights.is_file():
        raise SystemExit(f"{args.weights}: the pretrained backbone is needed (see ../shared/weights/README.md)")

    import dogtl
    from dogtl.core.artifacts import load_metadata
    from dogtl.evaluation.evaluate import EvaluateConfig, evaluate
    from dogtl.head.auto import AUTO_PARAMS, auto_train

    work = args.work
    data = digits_dataset(work / "data")
    caches = {}
    for name, size in (("A", 96), ("B", 128)):
        caches[name] = work / f"digits-{size}.h5"
        t = time.perf_counter()
        dogtl.extract_features(data, caches[name], backbone="mobilenet_v2", weights=str(args.weights),
                               image_size=size, passes=2, tta_passes=0, val_fraction=0.2, seed=2018,
                               batch_size=64, progress=False, **AUGMENTATION)
        print(f"cache {name}: mobilenet_v2 at {size} px, clean + 2 augmented passes ({time.perf_counter() - t:.0f} s,"
              " 0 if it was there)", flush=True)
    models = work / "models"
    models.mkdir(exist_ok=True)
    rows = []

    def row(label, metrics, seconds):
        rows.append((label, metrics["val_accuracy"], metrics["val_log_loss"], seconds))
        print(f"  {label:<52} acc {metrics['val_accuracy']:.4f}  log loss {metrics['val_log_loss']:.4f}  "
              f"{seconds:6.1f} s", flush=True)

    def head(label, out, cache, **settings):
        t = time.perf_counter()
        r = dogtl.train_head(cache, models / out, force=True, progress=False, **settings)
        row(label, r.metrics, time.perf_counter() - t)
        return models / out

    def tta(label, model):
        t = time.perf_counter()
        r = evaluate(EvaluateConfig(model=str(model), tta=True, force=True))
        row(label, {"val_accuracy": r.tta["accuracy"], "val_log_loss": r.tta["log_loss"]}, time.perf_counter() - t)

    print("validation split of cache A/B (the same 360 images)", flush=True)
    default = head("default head (train-head)", "default.keras", caches["A"])
    linear = head("linear head (--hidden none)", "linear.keras", caches["A"], hidden=())
    head("two caches concatenated, default head", "concat.keras", [caches["A"], caches["B"]])
    head("two caches concatenated, linear head", "concat-linear.keras", [caches["A"], caches["B"]], hidden=())

    t = time.perf_counter()
    sweep = dogtl.sweep(caches["A"], params=AUTO_PARAMS, trials=args.trials, ensemble=5, out=work / "sweep",
                        force=True, progress=False)
    seconds = time.perf_counter() - t
    row(f"sweep {args.trials} trials: best single trial, retrained", sweep.ensemble.member_metrics[0], seconds)
    row("sweep: top-5 ensemble (--ensemble 5)", sweep.ensemble.metrics, seconds)

    tta("TTA (evaluate --tta), default head", default)
    tta("TTA, linear head", linear)
    tta("TTA, sweep top-5 ensemble", sweep.ensemble.model_path)

    for label, cache, out in (("A", caches["A"], "auto-a.keras"), ("A + B", [caches["A"], caches["B"]], "auto-ab.keras")):
        t = time.perf_counter()
        r = auto_train(cache, models / out, budget=args.budget, force=True)
        seconds = time.perf_counter() - t
        row(f"one command: train-head --auto --budget {args.budget:.0f} on {label}", r.metrics, seconds)
        print(f"    ({r.trials} trials searched; its best single trial retrained: log loss "
              f"{r.best_single['val_log_loss']:.4f})", flush=True)
    tta("TTA of the --auto ensemble on A + B", models / "auto-ab.keras")

    base = rows[0][2]
    print("\n| run | val accuracy | val log loss | vs default log loss | seconds |")
    print("|---|---|---|---|---|")
    for label, acc, loss, seconds in rows:
        print(f"| {label} | {acc:.4f} | {loss:.4f} | {100 * (loss - base) / base:+.0f}% | {seconds:.1f} |")
    print(f"\n(2 shared CPU cores, other work running: seconds are inflated; {load_metadata(default)['val_images']} "
          "validation images)")


if __name__ == "__main__":
    main()
