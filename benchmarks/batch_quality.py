"""Do train-head's speed defaults lose accuracy: the automatic batch size, and bfloat16 matmuls?

The reference recipe trains the head at batch 16 with RMSprop between 1e-4 and 1e-3, in
float32. train-head's default raises the batch to 32/64/128 when an epoch keeps >= 64 steps,
scales the default rates by sqrt(batch / 16), and (precision "auto") multiplies in bfloat16
on CPUs that have it. This script compares, on real features of demo-like data
(dogtl.synthetic images through a randomly initialised Xception at 71 px whose BatchNorm
statistics come from the images, as `dogtl demo` does offline), the validation log loss of
the default against batch 16 at the recipe's rates in float32, and against the default
batch in float32, seed by seed:

  - "kaggle-like": 120 classes x 70 images (8,400; 7,560 train), "default" at the batch the
    real Kaggle data (9,200 training images) gets: 128, i.e. 59 steps per epoch here;
  - "demo": the demo's 4 classes x 16 images (48 train -> default stays 16, float32 vs bfloat16).

    python benchmarks/batch_quality.py --dir /tmp/bq        # ~35 min on 2 cores (extraction ~12)
    python benchmarks/batch_quality.py --dir /tmp/bq --quick
Caches are kept in --dir and reused on the next run.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def make_cache(root: Path, name: str, classes: int, per_class: int, passes: int, val_fraction: float) -> Path:
    from dogtl.core.backbones import get_backbone
    from dogtl.features.extract import extract_features
    from dogtl.features.settings import ExtractConfig
    from dogtl.data.images import image_dataset
    from dogtl.core.models import build_backbone, calibrate_batchnorm
    from dogtl.data.synthetic import make_kaggle_dataset

    cache = root / f"{name}.h5"
    if cache.exists():
        return cache
    data = make_kaggle_dataset(root / f"data_{name}", num_classes=classes, per_class=per_class, test_images=0,
                               size=96, seed=3)
    spec = get_backbone("xception")
    backbone = build_backbone(spec, "none", 71)
    files = sorted((data / "train").iterdir())
    files = files[:: max(1, len(files) // 64)][:64]
    _, _, batch = next(iter(image_dataset(files, spec, 71, batch_size=len(files))))
    calibrate_batchnorm(backbone, batch)
    weights = root / f"{name}.weights.h5"
    backbone.save_weights(weights)
    extract_features(ExtractConfig(data=str(data), cache=str(cache), backbone="xception", weights=str(weights),
                                   image_size=71, passes=passes, val_fraction=val_fraction, batch_size=64))
    return cache


def compare(cache: Path, seeds: range, epochs: int, default_rows: int | None = None) -> None:
    """default_rows: train as the default does for that many training images (None: this cache's)."""
    from dogtl.features.cache import open_cache
    from dogtl.head.settings import RECIPE_BATCH_SIZE, HeadConfig, resolve_batch_size
    from dogtl.head.train import fit_head, load_training_data

    c = open_cache(cache)
    d = load_training_data(c)
    batch = resolve_batch_size(None, default_rows) if default_rows else None
    runs = {}
    for label, make in (("recipe batch 16", lambda s: HeadConfig(batch_size=RECIPE_BATCH_SIZE, base_lr=1e-4,
                                                                    max_lr=1e-3, seed=s, epochs=epochs,
                                                                    precision="float32")),
                        ("default float32", lambda s: HeadConfig(batch_size=batch, seed=s, epochs=epochs,
                                                                 precision="float32")),
                        ("default", lambda s: HeadConfig(batch_size=batch, seed=s, epochs=epochs))):
        runs[label] = []
        for seed in seeds:
            fit = fit_head(make(seed), d.train_features, d.train_labels, d.val_features, d.val_labels,
                           len(c.classes))
            runs[label].append(fit.metrics["val_log_loss"])
            r = fit.resolved
            print(f"  {cache.stem}: {label:>15} (batch {r.batch_size}, lr {r.base_lr:.2g}..{r.max_lr:.2g}, "
                  f"{r.precision}) "
                  f"seed {seed}: "
                  f"val log loss {fit.metrics['val_log_loss']:.4f}, accuracy {fit.metrics['val_accuracy']:.4f}, "
                  f"best epoch {fit.metrics['best_epoch']}, {fit.seconds_per_epoch:.2f} s/epoch", flush=True)
    for reference in ("recipe batch 16", "default float32"):
        base, new = runs[reference], runs["default"]
        diff = [b - a for a, b in zip(base, new)]
        sem = statistics.stdev(diff) / len(diff) ** 0.5 if len(diff) > 1 else float("nan")
        print(f"{cache.stem}: {d.train_features.shape[1]} train / {len(d.val_labels)} val images, {len(seeds)} seeds: "
              f"val log loss {reference} {statistics.mean(base):.4f}, default {statistics.mean(new):.4f}, "
              f"default - {reference} {statistics.mean(diff):+.4f} +- {sem:.4f} (sem), default better in "
              f"{sum(x < 0 for x in diff)}/{len(diff)} seeds", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True, help="folder for the data and caches (kept)")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of this script")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    if args.quick:
        compare(make_cache(args.dir, "quick", 6, 12, 1, 0.25), range(1, 3), 3)
        return
    compare(make_cache(args.dir, "demo", 4, 16, 2, 0.25), range(1, args.seeds + 1), 50)
    compare(make_cache(args.dir, "kaggle-like", 120, 70, 2, 0.1), range(1, args.seeds + 1), 50, default_rows=9200)


if __name__ == "__main__":
    main()
