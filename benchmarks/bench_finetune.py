"""Fine-tuning images/s: dogtl's input pipeline against the plain Keras recipe, in one run.

Both sides train the same model (backbone -> pooling -> head, the same top blocks unfrozen,
BatchNorm frozen, SGD lr 1e-4 momentum 0.9) with `model.fit`:
  dogtl  JPEG files -> tf.data decode/resize/augment in parallel (`finetune.data.training_dataset`,
         exactly what `dogtl finetune` feeds to fit), nothing held in memory;
  plain  every image decoded, resized and preprocessed into one in-memory float32 array
         beforehand (not timed, ~1 GB per 3,000 images at 299 px), then `model.fit(x, y)`.
Target: ratio >= 1.0, i.e. streaming and augmenting the images costs nothing visible.

    python benchmarks/bench_finetune.py --mode plain            # xception at 299 px, 96 images, 3 timed epochs
    python benchmarks/bench_finetune.py --mode plain --quick    # smoke run: mobilenet_v2 at 96 px, seconds

--mode cache (the default; issue 13): `dogtl finetune` from the images against `dogtl finetune
--from-cache` on the cut activations of `extract-features --cut-blocks N`, same settings, in one
run, through the real stage functions (extract -> train-head -> finetune both ways):
  speed    seconds per epoch (validation included, each on its own source: the validation images
           or their cached clean pass), --backbone (xception, weights none) at --image-size,
           median of the epochs after the first (which traces); target >= 3x for Xception's top 2
           blocks (the limit is ~3.7x: 0.94 of 8.36 GMAC per image is in blocks 13-14, and the
           backward pass runs only there);
  quality  validation log loss after each of the same epochs, on real images: sklearn's digits
           upscaled to 96 px through the real pretrained mobilenet_v2 of ../shared/weights/.

    python benchmarks/bench_finetune.py                 # xception 299 px, 48 images; digits 600 images
    python benchmarks/bench_finetune.py --quick         # smoke run
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
    from dogtl.core.schedules import make_optimizer

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


WEIGHTS = Path(__file__).resolve().parents[1].parent / "shared" / "weights" / "mobilenet_v2_stanford_dogs.weights.h5"


def digits_folder(root: Path, per_class: int, size: int) -> Path:
    """sklearn's 8x8 digits as `size` px RGB JPEGs, one sub-folder per class (real images)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for c in range(10):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        for k, i in enumerate(np.flatnonzero(d.target == c)[:per_class]):
            pixels = (d.images[i] * (255 / 16)).astype(np.uint8)
            Image.fromarray(pixels).resize((size, size), Image.BILINEAR).convert("RGB").save(root / str(c) / f"{k}.jpg",
                                                                                         quality=95)
    return root


def finetune_both(root: Path, data: Path, backbone: str, weights: str, size: int, epochs: int, blocks: int,
                  batch: int, passes: int, head_epochs: int, seed: int = 0) -> dict:
    """Extract with the cut, train a head, fine-tune from images and from the cache; per side the
    seconds of each epoch and its history."""
    from dogtl import api

    cache, head = root / "features.h5", root / "head.keras"
    t = time.perf_counter()
    api.extract_features(data, cache, progress=False, backbone=backbone, weights=weights, image_size=size,
                         passes=passes, batch_size=32, dtype="float32", cut_blocks=blocks, val_fraction=0.2, seed=seed)
    extract_s = time.perf_counter() - t
    api.train_head(cache, head, progress=False, epochs=head_epochs, seed=seed)
    out = {"extract_s": extract_s}
    for name, from_cache in (("images", False), ("cache", True)):
        marks = []
        t0 = time.perf_counter()
        r = api.finetune(data, head, root / f"ft-{name}.keras", from_cache=from_cache,
                         progress=lambda e: e.line() and marks.append(time.perf_counter()), epochs=epochs, patience=epochs + 1,
                         trainable_blocks=blocks, batch_size=batch, optimizer="adam", base_lr=1e-4, seed=seed,
                         schedule="constant", augment="cache", batchnorm="frozen")  # the same recipe both ways
        times = np.diff([t0, *marks]).tolist()  # the first includes building, epoch 0's validation and tracing
        out[name] = {"epoch_s": times, "history": r.history, "before": r.before, "after": r.after}
    return out


def main_cache(args) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        from dogtl.data.synthetic import make_kaggle_dataset

        tmp = Path(tmp)
        data = make_kaggle_dataset(tmp / "speed" / "data", num_classes=4, per_class=args.images // 4,
                                   test_images=0, size=args.source_size)
        speed = finetune_both(tmp / "speed", data, args.backbone, "none", args.image_size, args.epochs,
                              args.trainable_blocks, args.batch_size, passes=args.epochs, head_epochs=3)
        quality = []
        if WEIGHTS.exists():
            digits = digits_folder(tmp / "digits" / "data", args.digits_per_class, 96)
            for seed in range(args.seeds):
                quality.append(finetune_both(tmp / "digits" / f"s{seed}", digits, "mobilenet_v2", str(WEIGHTS), 96,
                                             args.epochs, 2, args.batch_size, passes=args.epochs, head_epochs=20,
                                             seed=seed))

    def per_epoch(side):
        later = speed[side]["epoch_s"][1:]
        return statistics.median(later) if later else speed[side]["epoch_s"][0]

    img, cac = per_epoch("images"), per_epoch("cache")
    print(f"fine-tuning {args.backbone} (weights none) at {args.image_size} px, top {args.trainable_blocks} blocks, "
          f"batch {args.batch_size}, {args.images} images ({args.images - args.images // 5} train), {args.epochs} "
          f"epochs per side, {os.cpu_count()} CPUs (shared machine)")
    print(f"  extraction with --cut-blocks {args.trainable_blocks} (1 clean + {args.epochs} passes): "
          f"{speed['extract_s']:.1f} s (paid once, by stage one)")
    for side, label in (("images", "from images "), ("cache", "from cache  ")):
        print(f"  {label}: {statistics.median(speed[side]['epoch_s'][1:] or speed[side]['epoch_s']):7.2f} s/epoch "
              f"(epochs: {', '.join(f'{t:.2f}' for t in speed[side]['epoch_s'])} s; the first includes set-up)")
    print(f"  speed-up from the cache: {img / cac:.2f}x per epoch (target >= 3x for xception's top 2 blocks)")
    if not quality:
        print(f"  quality part skipped: {WEIGHTS} not found")
        return 0
    print(f"validation log loss, digits ({args.digits_per_class} per class, 20% validation) at 96 px through the "
          f"pretrained mobilenet_v2, top 2 blocks, the same epochs:")
    for seed, q in enumerate(quality):
        rows = []
        for side in ("images", "cache"):
            h = q[side]["history"]
            rows.append(f"{side:6s} head {q[side]['before']['val_log_loss']:.4f} -> epochs "
                        + " ".join(f"{v:.4f}" for v in h["val_loss"]) + f"  kept {q[side]['after']['val_log_loss']:.4f}")
        print(f"  seed {seed}: " + "\n          ".join(rows))
    last = {side: [q[side]["history"]["val_loss"].iloc[-1] for q in quality] for side in ("images", "cache")}
    for side in last:
        print(f"  after {args.epochs} epochs, {side:6s}: mean {statistics.mean(last[side]):.4f}"
              + (f" +- {statistics.stdev(last[side]):.4f} (sd over {len(last[side])} seeds)" if len(last[side]) > 1 else ""))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["cache", "plain"], default="cache")
    parser.add_argument("--digits-per-class", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--backbone", default="xception")
    parser.add_argument("--image-size", type=int, default=299)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--source-size", type=int, default=400, help="pixels of the generated JPEGs")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per side, interleaved (after one warm-up epoch each)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--trainable-blocks", type=lambda v: v if v == "all" else int(v), default=2)
    parser.add_argument("--quick", action="store_true", help="smoke run at a reduced size")
    args = parser.parse_args(argv)
    if args.mode == "cache":
        if args.quick:
            args.backbone, args.image_size, args.images, args.source_size = "xception", 71, 24, 96
            args.epochs, args.digits_per_class, args.seeds = 2, 12, 1
        elif args.images == 96:
            args.images = 48
        return main_cache(args)
    if args.quick:
        args.backbone, args.image_size, args.images, args.source_size = "mobilenet_v2", 96, 32, 128
        args.epochs = 2

    import keras

    from dogtl.data.augment import AugmentConfig
    from dogtl.core.backbones import get_backbone
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
