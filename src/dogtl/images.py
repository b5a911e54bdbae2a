"""tf.data pipelines from image files to model-ready batches.

Shared by extraction, fine-tuning and prediction so all stages see the same pixels.
Files are decoded in parallel and never held all at once: memory is bounded by the
prefetch depth, whatever the number of images.
"""

from __future__ import annotations

from pathlib import Path

from .augment import AugmentConfig, augment, image_seed
from .backbones import BackboneSpec


def preprocess_fn(spec: BackboneSpec):
    import importlib

    return importlib.import_module(f"keras.applications.{spec.module}").preprocess_input


def load_image(path, image_size: int):
    """Decode any JPEG/PNG/GIF/BMP (grey, CMYK, 16-bit, alpha) to float RGB at size."""
    import tensorflow as tf

    data = tf.io.read_file(path)
    image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, 3])
    return tf.image.resize(tf.cast(image, tf.float32), [image_size, image_size], antialias=True)


def image_dataset(paths, spec: BackboneSpec, image_size: int, *, positions=None, indices=None,
                  pass_index=0, seed: int = 0, augmentation: AugmentConfig | None = None,
                  batch_size: int = 32, skip_bad: bool = True):
    """Batches of (position, index, image) for pass `pass_index` over `paths`.

    `indices` are the images' stable numbers (the augmentation seed); `positions` their
    place in this run's order. Unreadable files are dropped when `skip_bad`, so callers
    find them as positions missing from the batches.
    """
    import tensorflow as tf

    paths = [str(p) for p in paths]
    n = len(paths)
    positions = list(range(n)) if positions is None else list(positions)
    indices = positions if indices is None else list(indices)
    preprocess = preprocess_fn(spec)
    augmented = pass_index > 0 and augmentation is not None

    def load(position, index, path):
        image = load_image(path, image_size)
        if augmented:
            image = augment(image, augmentation, image_seed(seed, pass_index, index))
        return position, index, preprocess(image)

    ds = tf.data.Dataset.from_tensor_slices(
        (tf.constant(positions, tf.int64), tf.constant(indices, tf.int64), tf.constant(paths, tf.string))
    )
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if skip_bad:
        ds = ds.ignore_errors()
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def decode_error(path: str | Path) -> str | None:
    """Why TensorFlow cannot decode this file (None when it can), for reports."""
    import tensorflow as tf

    try:
        load_image(str(path), 8)
        return None
    except (tf.errors.OpError, OSError) as e:
        message = getattr(e, "message", str(e)).strip().splitlines()
        return (message[-1] if message else type(e).__name__)[:200]
