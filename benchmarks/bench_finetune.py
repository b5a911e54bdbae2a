"""Fine-tuning images/s: dogtl's input pipeline against the plain Keras recipe, in one run.

Both sides train the same model (backbone -> pooling -> head, the same top blocks unfrozen,
BatchNorm frozen, SGD lr 1e-4 momentum 0.9) with `model.fit`:
  dogtl  JPEG files -> tf.data decode/resize/augment in parallel (`finetune.data.training_dataset`,
         exactly what `dogtl finetune` feeds to fit), nothing held in memory;
  plain  every image decoded, resized and preprocessed into one in-memory float32 array
         beforehand (not timed, ~1 GB per 3,000 images at 299 px), then `model.fit(x, y)`.
Target: ratio >= 1.0, i.e. streaming and augmenting the images costs nothing visible.

    python benchmarks/bench_finetune.py            # xception at 299 px, 96 images, 3 timed epochs
    python benchmarks/bench_finetune.py --quick    # smoke run: mobilenet_v2 at 96 px, seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def build_model(spec, size: int, num_classes: int, blocks: int):
    from dogtl.core.models import build_backbone, build_head, compose, freeze_batchnorm, unfreeze_top_blocks
    from dogtl.head.schedules import make_optimizer

    backbone = build_backbone(spec, "none", size)
    unfreeze_top_blocks(backbone, spec, blocks)
    head = build_head(spec.feature_dim, num_classes, hidden=(256,))
    freeze_batchnorm(head)
    model = compose(backbone, head)
    model.compile(optimizer=make_optimizer("sgd", 1e-4), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def in_memory(paths, spec, size: int) -> np.ndarray:
    """The plain recipe's input: all images decoded into one array (same pixels as dogtl's clean pass)."""
    from dogtl.data.images import image_dataset

    x = np.empty((len(paths), size, size, 3), np.float32)
    for pos, _, images in image_dataset(paths, spec, size, batch_size=64, skip_bad=False):
        x[pos.numpy()] = images.numpy()
    return x


def one_epoch(model, data, images: int, **fit) -> float:
    """images/s of one epoch of model.fit (iterator start-up included: dogtl pays it, not plain)."""
    start = time.perf_counter()
    model.fit(data, epochs=1, verbose=0, **fit)
    return images / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="xception")
    parser.add_argument("--image-size", type=int, default=299)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--source-size", type=int, default=400, help="pixels of the generated JPEGs")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per side, interleaved (after one warm-up epoch each)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--trainable-blocks", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke run at a reduced size")
    args = parser.parse_args(argv)
    if args.quick:
        args.backbone, args.image_size, args.images, args.source_size = "mobilenet_v2", 96, 32, 128
        args.epochs = 2

    import keras

    from dogtl.data.augment import AugmentConfig
    from dogtl.features.backbones import get_backbone
    from dogtl.finetuning.data import training_dataset
    from dogtl.data.synthetic import make_kaggle_dataset

    spec = get_backbone(args.backbone)
    classes = 4
    with tempfile.TemporaryDirectory() as tmp:
        data = make_kaggle_dataset(Path(tmp) / "data", num_classes=classes, per_class=args.images // classes,
                                   test_images=0, size=args.source_size)
        paths = sorted((data / "train").iterdir())
        n = len(paths)
        labels = np.arange(n) % classes
        steps = -(-n // args.batch_size)

        keras.utils.set_random_seed(0)
        ours = build_model(spec, args.image_size, classes, args.trainable_blocks)
        keras.utils.set_random_seed(0)
        plain = build_model(spec, args.image_size, classes, args.trainable_blocks)
        assert [v.shape for v in ours.trainable_variables] == [v.shape for v in plain.trainable_variables]

        stream = training_dataset(paths, np.arange(n), labels, spec, args.image_size, seed=0,
                                  augmentation=AugmentConfig(), batch_size=args.batch_size,
                                  epochs=range(1)).repeat()
        x, y = in_memory(paths, spec, args.image_size), labels
        sides = {"dogtl": lambda: one_epoch(ours, stream, n, steps_per_epoch=steps, shuffle=False),
                 "plain": lambda: one_epoch(plain, x, n, y=y, batch_size=args.batch_size, shuffle=True)}
        for measure in sides.values():
            measure()  # warm-up epoch: tracing, thread pools
        rates = {"dogtl": [], "plain": []}
        for _ in range(args.epochs):  # interleaved, so a change in machine load hits both sides
            for name, measure in sides.items():
                rates[name].append(measure())

    dogtl, base = statistics.median(rates["dogtl"]), statistics.median(rates["plain"])
    print(f"fine-tuning {spec.name} at {args.image_size} px, top {args.trainable_blocks} blocks, batch "
          f"{args.batch_size}, {n} images of {args.source_size} px, median of {args.epochs} interleaved epochs per side")
    print(f"dogtl pipeline (JPEG decode + augment, streamed): {dogtl:8.2f} images/s  "
          f"{['%.2f' % r for r in rates['dogtl']]}")
    print(f"plain Keras (in-memory float32 arrays):          {base:8.2f} images/s  "
          f"{['%.2f' % r for r in rates['plain']]}")
    print(f"ratio dogtl / plain: {dogtl / base:.2f}x (target >= 1.0)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    sys.exit(main())
