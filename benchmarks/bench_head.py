"""Head training speed: seconds per epoch on cached features vs the online recipe.

Builds a synthetic cache of Kaggle dog-breed size (9,174 x 2,048 features, 120 classes,
1 clean + 5 augmented passes, float16 as extract-features stores them) and measures in
one run, on the same machine:
  - `model.fit` on the clean in-memory features at batch 16 (the plain approach);
  - dogtl's compiled epoch loop (trainloop.EpochRunner via head.fit_head, validation
    included) at batch 16 (the recipe's) and at the default batch size, with float32 and
    with the default precision (bfloat16 matmuls on CPUs that have them, see precision.py);
  - the online recipe it replaces: JPEG files of Kaggle size (414 x 414 px, about the
    dataset's mean pixel count) read, decoded and augmented by dogtl's own tf.data pipeline,
    then frozen Xception (weights=None) at 299 px + the same head trained on them, a few
    steps timed and scaled to an epoch of 9,174 images; also the backbone + head step alone
    on ready tensors (a lower bound: no decoding, no augmentation);
  - lr-find on the same cache.
Absolute times are noisy on a shared machine; the ratios are measured side by side.

    python benchmarks/bench_head.py            # full size (~2-4 minutes on 2 cores)
    python benchmarks/bench_head.py --quick    # reduced smoke run (~30 s)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def head_seconds_per_epoch(data, num_classes: int, batch_size: int, epochs: int, precision: str = "auto") -> float:
    """Median seconds per epoch (training + validation) after the first (tracing) epoch."""
    from dogtl.head.settings import HeadConfig
    from dogtl.head.train import fit_head

    times = []
    config = HeadConfig(epochs=epochs, batch_size=batch_size, patience=0, precision=precision)
    fit_head(config, data.train_features, data.train_labels, data.val_features, data.val_labels, num_classes,
             on_epoch=lambda event: times.append(event.seconds))
    return statistics.median(times[1:])


def ablation_seconds_per_epoch(data, num_classes: int, batch_size: int, epochs: int, **switches) -> float:
    """The compiled epoch loop (training only) with one of its speed-ups switched off."""
    import keras

    from dogtl.head.settings import HeadConfig
    from dogtl.head.train import build_compiled_head
    from dogtl.head.trainloop import EpochRunner

    keras.utils.set_random_seed(0)
    config = HeadConfig(batch_size=batch_size)
    model, _ = build_compiled_head(config, data.train_features.shape[2], num_classes,
                                   config.resolve(data.train_features.shape[1]))
    runner = EpochRunner(model, data.train_features, data.train_labels, batch_size, 0, **switches)
    times = []
    for epoch in range(epochs):
        t = time.perf_counter()
        runner.run(epoch)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def plain_fit_seconds(data, num_classes: int, batch_size: int, epochs: int) -> float:
    import keras

    from dogtl.head.settings import HeadConfig
    from dogtl.head.train import build_compiled_head

    keras.utils.set_random_seed(0)
    config = HeadConfig(batch_size=batch_size)
    model, _ = build_compiled_head(config, data.train_features.shape[2], num_classes,
                                   config.resolve(data.train_features.shape[1]))
    x = data.train_features[0].astype(np.float32)
    times = []
    for _ in range(epochs):
        t = time.perf_counter()
        model.fit(x, data.train_labels, batch_size=batch_size, epochs=1, verbose=0,
                  validation_data=(data.val_features, data.val_labels))
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def online_seconds_per_image(folder: Path, jpeg_size: int, image_size: int, num_classes: int, batch_size: int,
                             steps: int) -> tuple[float, float]:
    """Frozen Xception + head trained on images, as the online recipe does every epoch:
    (seconds per image from JPEG files through decoding and augmentation, seconds per
    image of the training step alone on ready tensors)."""
    import keras
    import tensorflow as tf

    from dogtl.data.augment import AugmentConfig
    from dogtl.core.backbones import get_backbone
    from dogtl.data.images import image_dataset
    from dogtl.core.models import build_backbone, build_head, compose
    from dogtl.data.synthetic import make_kaggle_dataset

    count = (steps + 1) * batch_size
    root = make_kaggle_dataset(folder, num_classes=4, per_class=-(-count // 4), test_images=0, size=jpeg_size)
    paths = sorted((root / "train").glob("*.jpg"))[:count]
    labels = tf.constant(np.random.default_rng(0).integers(0, num_classes, count))
    spec = get_backbone("xception")
    model = compose(build_backbone(spec, "none", image_size), build_head(spec.feature_dim, num_classes))
    model.compile(optimizer=keras.optimizers.RMSprop(1e-4, rho=0.9), loss="sparse_categorical_crossentropy")
    batches = image_dataset(paths, spec, image_size, pass_index=1, augmentation=AugmentConfig(),
                            batch_size=batch_size).map(lambda position, _, image: (image, tf.gather(labels, position)))
    stream = iter(batches)  # prefetching: tf.data decodes the next batches while the model trains
    x, y = next(stream)
    model.train_on_batch(x, y)  # build + trace
    t = time.perf_counter()
    for images, targets in stream:
        model.train_on_batch(images, targets)
    from_files = (time.perf_counter() - t) / (steps * batch_size)
    t = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return from_files, (time.perf_counter() - t) / (steps * batch_size)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced sizes: a smoke test of this script")
    parser.add_argument("--epochs", type=int, default=6, help="epochs timed per setting (the first is dropped)")
    parser.add_argument("--online-steps", type=int, default=10, help="online recipe steps timed")
    parser.add_argument("--skip-online", action="store_true", help="do not time the online recipe")
    parser.add_argument("--ablation", action="store_true",
                        help="also time the epoch loop at batch 16 without each of its two speed-ups")
    args = parser.parse_args()

    from dogtl.features.cache import open_cache
    from dogtl.head.settings import RECIPE_BATCH_SIZE, resolve_batch_size
    from dogtl.head.train import load_training_data
    from dogtl.head.lrfind import LRFindConfig, lr_find
    from dogtl.core.precision import resolve
    from dogtl.features.synthetic import write_feature_cache

    if args.quick:
        n, dim, classes, passes, image_size, jpeg_size, online_steps, online_batch = 600, 256, 20, 5, 71, 96, 1, 4
    else:
        n, dim, classes, passes, image_size, jpeg_size = 9174, 2048, 120, 5, 299, 414
        online_steps, online_batch = args.online_steps, 16
    epochs = max(2, args.epochs if not args.quick else 2)

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        path = write_feature_cache(Path(tmp) / "features.h5", num_images=n, num_classes=classes, dim=dim,
                                   passes=passes, val_fraction=0.1, dtype="float16", separation=0.3)
        write_s = time.perf_counter() - t
        t = time.perf_counter()
        data = load_training_data(open_cache(path))
        load_s = time.perf_counter() - t
        rows = data.train_features.shape[1]
        default_batch = resolve_batch_size(None, rows)
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (others' work slows "
              "every line below; compare ratios)")
        print(f"synthetic cache: {n} x {dim} features, {classes} classes, 1 clean + {passes} augmented passes "
              f"({rows} train / {len(data.val_labels)} val rows); written in {write_s:.1f} s, loaded in {load_s:.1f} s")

        fit16 = plain_fit_seconds(data, classes, RECIPE_BATCH_SIZE, epochs)
        print(f"model.fit, clean features only, batch {RECIPE_BATCH_SIZE}: {fit16:.2f} s/epoch")
        precision = resolve("auto", head_batch=default_batch)
        ours16 = head_seconds_per_epoch(data, classes, RECIPE_BATCH_SIZE, epochs)
        print(f"dogtl head epoch, batch {RECIPE_BATCH_SIZE}, default precision "
              f"({resolve('auto', head_batch=RECIPE_BATCH_SIZE)}): {ours16:.2f} s/epoch "
              f"(target <= 3 s; {fit16 / ours16:.1f}x faster than model.fit)")
        if precision != "float32":
            ours32 = head_seconds_per_epoch(data, classes, None, epochs, "float32")
            print(f"dogtl head epoch, default batch {default_batch}, float32: {ours32:.2f} s/epoch")
        ours = head_seconds_per_epoch(data, classes, None, epochs)  # the automatic default
        print(f"dogtl head epoch, default batch {default_batch}, default precision ({precision}): {ours:.2f} s/epoch "
              f"(target <= 1.5 s; {fit16 / ours:.1f}x faster than model.fit at batch {RECIPE_BATCH_SIZE})")

        if args.ablation:
            for label, switches in (("all speed-ups", {}), ("no XLA optimizer update", {"jit_optimizer": False}),
                                    ("no fast MatMul gradient", {"fast_matmul_grad": False})):
                s = ablation_seconds_per_epoch(data, classes, RECIPE_BATCH_SIZE, epochs, **switches)
                print(f"  ablation, batch {RECIPE_BATCH_SIZE}, training only, {label}: {s:.2f} s/epoch")

        t = time.perf_counter()
        found = lr_find(LRFindConfig(), cache=path, out=Path(tmp) / "lr.png")
        print(f"lr-find: {len(found.losses)} steps{' (stopped at divergence)' if found.diverged else ''} "
              f"in {time.perf_counter() - t:.1f} s including loading the cache; suggests base {found.base_lr:.1e}, "
              f"max {found.max_lr:.1e}")

        if args.skip_online:
            return
        per_image, step_only = online_seconds_per_image(Path(tmp) / "jpegs", jpeg_size, image_size, classes,
                                                        online_batch, online_steps)
    online = per_image * n
    print(f"online recipe ({jpeg_size} px JPEGs -> decode + augment -> frozen xception weights=None at "
          f"{image_size} px + head, batch {online_batch}, {online_steps} steps timed): {per_image:.3f} s/image "
          f"-> {online:.0f} s per epoch of {n} images")
    print(f"  the training step alone on ready tensors: {step_only:.3f} s/image -> {step_only * n:.0f} s per epoch "
          f"(a lower bound: speed-up {step_only * n / ours:.0f}x at the default settings)")
    print(f"speed-up over the online recipe: {online / ours:.0f}x at the default settings (batch {default_batch}, "
          f"{precision}; target >= 1000x), {online / ours16:.0f}x at batch {RECIPE_BATCH_SIZE}")
    print(f"machine load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
