"""Batches for models with one image input per backbone (multi-backbone heads on images).

Each backbone reads the same files at its own size with its own preprocessing, through the
pipeline of extraction (`images.image_dataset`), so every input sees exactly the pixels its
cache was made from; pass p > 0 is the same augmentation (seed, pass, image) at every size.
The per-backbone streams skip the same unreadable files, so their batches stay aligned.
TensorFlow is imported in the function that uses it: importing this module costs no
TensorFlow start-up.
"""

from __future__ import annotations

from dogtl.data.images import image_dataset


def model_image_dataset(paths, spec, image_size, **options):
    """Batches of (position, index, image) for one backbone, or (position, index, (image, ...))
    when `spec` and `image_size` are lists (one per backbone, in the model's input order)."""
    import tensorflow as tf

    if not isinstance(spec, (list, tuple)):
        return image_dataset(paths, spec, image_size, **options)
    streams = tuple(image_dataset(paths, s, size, **options) for s, size in zip(spec, image_size))
    return tf.data.Dataset.zip(streams).map(
        lambda *batches: (batches[0][0], batches[0][1], tuple(b[2] for b in batches)))
