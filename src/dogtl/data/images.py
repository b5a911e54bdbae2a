"""tf.data pipelines from image files to model-ready batches.

Shared by extraction, fine-tuning and prediction so all stages see the same pixels.
Files are decoded in parallel and never held all at once: memory is bounded by the
prefetch depth, whatever the number of images. Large JPEGs are decoded already
shrunk (libjpeg's DCT scaling), and an image that would still decode to more than
MAX_PIXELS is refused as unreadable instead of exhausting memory.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from dogtl.data.augment import AugmentConfig, augment, image_seed
from dogtl.core.backbones import BackboneSpec

MAX_PIXELS = 40_000_000  # decoded pixels (e.g. 8000 x 5000); ~0.5 GB as float32 RGB
TOO_LARGE = "image too large"
_JPEG_RATIOS = (1, 2, 4, 8)  # the DCT scalings libjpeg does for free
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def preprocess_fn(spec: BackboneSpec):
    return importlib.import_module(f"keras.applications.{spec.module}").preprocess_input


def _decode_jpeg(data, image_size: int):
    """JPEG at the smallest DCT scaling that keeps both sides >= image_size."""
    import tensorflow as tf

    shape = tf.image.extract_jpeg_shape(data)
    short = tf.minimum(shape[0], shape[1])
    k = tf.constant(0)
    for j, ratio in enumerate(_JPEG_RATIOS[1:], start=1):
        k = tf.where(short // ratio >= image_size, j, k)
    branches = [lambda r=r: tf.image.decode_jpeg(data, channels=3, ratio=r) for r in _JPEG_RATIOS]
    return tf.switch_case(k, branches)


def _check_png_size(data):
    """Refuse PNG decompression bombs from the header, before decoding allocates them."""
    import tensorflow as tf

    def dims():
        return tf.cast(tf.io.decode_raw(tf.strings.substr(data, 16, 8), tf.int32, little_endian=False), tf.int64)

    is_png = tf.logical_and(tf.strings.length(data) >= 24,
                            tf.strings.substr(data, 0, 8) == _PNG_SIGNATURE)
    wh = tf.cond(is_png, dims, lambda: tf.zeros([2], tf.int64))
    return tf.debugging.assert_less_equal(wh[0] * wh[1], tf.constant(MAX_PIXELS, tf.int64),
                                          message=f"{TOO_LARGE} (over {MAX_PIXELS} pixels)")


def decode_image(data, image_size: int):
    """Encoded bytes (JPEG/PNG/GIF/BMP/WebP; grey, CMYK, 16-bit, alpha) -> float RGB at size."""
    import tensorflow as tf

    with tf.control_dependencies([_check_png_size(data)]):
        image = tf.cond(tf.io.is_jpeg(data),
                        lambda: _decode_jpeg(data, image_size),
                        lambda: tf.io.decode_image(data, channels=3, expand_animations=False,
                                                   dtype=tf.uint8))
    image.set_shape([None, None, 3])
    shape = tf.shape(image, out_type=tf.int64)
    check = tf.debugging.assert_less_equal(shape[0] * shape[1], tf.constant(MAX_PIXELS, tf.int64),
                                           message=f"{TOO_LARGE} (over {MAX_PIXELS} pixels)")
    with tf.control_dependencies([check]):
        image = tf.cast(image, tf.float32)
    # Resizing to the same size is the identity (exactly): skip its cost for images already at size.
    same = tf.logical_and(shape[0] == image_size, shape[1] == image_size)
    image = tf.cond(same, lambda: image,
                    lambda: tf.image.resize(image, [image_size, image_size], antialias=True))
    image.set_shape([image_size, image_size, 3])
    return image


def load_image(path, image_size: int):
    """Read and decode one image file to float RGB [size, size, 3] (values 0..255)."""
    import tensorflow as tf

    return decode_image(tf.io.read_file(path), image_size)


_LOADERS: dict = {}


def _loader(spec: BackboneSpec, image_size: int, seed: int, augmentation: AugmentConfig | None):
    """(index, path, pass) -> model-ready image, traced once per setting and shared by all
    the passes' pipelines (tracing it per pass would stall the model at every pass)."""
    import tensorflow as tf

    key = (spec, int(image_size), int(seed), augmentation)
    if key not in _LOADERS:
        preprocess = preprocess_fn(spec)
        scalar = tf.TensorSpec([], tf.int64)

        @tf.function(input_signature=[scalar, tf.TensorSpec([], tf.string), scalar])
        def load(index, path, pass_index):
            image = load_image(path, image_size)
            if augmentation is not None:
                image = tf.cond(pass_index > 0,
                                lambda: augment(image, augmentation, image_seed(seed, pass_index, index)),
                                lambda: image)
            return preprocess(image)

        _LOADERS[key] = load
    return _LOADERS[key]


def without_autotune(ds):
    """`ds` with tf.data's autotuner off (AUTOTUNE values then take tf.data's defaults). With it on,
    deleting a finished iterator stalled for ~5 s with every CPU idle, in about half the runs where
    a model (OpenVINO or TensorFlow) had consumed the batches (TensorFlow 2.21, 2 cores): a fixed
    5 s added to an extraction, a prediction or a fine-tuning epoch's validation. Off, no run
    stalled, and the batches came as fast."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def _segment(loader, tag, positions, indices, paths, pass_index, skip_bad):
    """Unbatched (tag, position, index, image) of one pass over `paths`."""
    import tensorflow as tf

    pass_index = tf.constant(pass_index, tf.int64)
    ds = tf.data.Dataset.from_tensor_slices(
        (tf.constant(positions, tf.int64), tf.constant(indices, tf.int64), tf.constant(paths, tf.string)))
    ds = ds.map(lambda position, index, path: (tag, position, index, loader(index, path, pass_index)),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if skip_bad:
        ds = ds.ignore_errors()
    return ds


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
    positions = list(range(len(paths))) if positions is None else list(positions)
    indices = positions if indices is None else list(indices)
    loader = _loader(spec, image_size, seed, augmentation)
    ds = _segment(loader, tf.constant(0, tf.int64), positions, indices, paths, pass_index, skip_bad).batch(batch_size)
    ds = ds.map(lambda _, position, index, image: (position, index, image))
    return without_autotune(ds.prefetch(tf.data.AUTOTUNE))


def multi_pass_dataset(segments, spec: BackboneSpec, image_size: int, *, seed: int,
                       augmentation: AugmentConfig | None, batch_size: int, skip_bad: bool = True):
    """One stream of batches (segment, position, index, image) over several passes.

    `segments` is a list of (pass_index, positions, indices, paths); they follow each other in
    order and are batched as one stream, so every batch but the last is full (a batch may end
    one segment and begin the next: its segment numbers say where) and decoding the next pass
    overlaps the model's work on the end of the previous one.
    """
    import tensorflow as tf

    loader = _loader(spec, image_size, seed, augmentation)
    parts = [_segment(loader, tf.constant(k, tf.int64), list(positions), list(indices), [str(p) for p in paths],
                      pass_index, skip_bad)
             for k, (pass_index, positions, indices, paths) in enumerate(segments) if len(paths)]
    if not parts:
        return None
    ds = parts[0]
    for part in parts[1:]:
        ds = ds.concatenate(part)
    return without_autotune(ds.batch(batch_size).prefetch(tf.data.AUTOTUNE))


def clean_reason(message: str) -> str:
    """TensorFlow's op error text without its graph/op decorations; an image over MAX_PIXELS
    as 'image too large (N pixels, at most MAX_PIXELS)', however TensorFlow formatted it
    (eagerly, or as a tf.function's 'assertion failed: [...] [x (mul:0) = ] [N]')."""
    text = re.sub(r"\{\{[^}]*\}\}", "", message)
    if TOO_LARGE in text:
        pixels = re.search(r"elements of x:\s*\[(\d+)\]|\[x \([^)]*\) = \] \[(\d+)\]", text)
        count = f"{int(pixels[1] or pixels[2]):,} pixels, " if pixels else ""
        return f"{TOO_LARGE} ({count}at most {MAX_PIXELS:,})"
    text = re.sub(r"^\s*assertion failed: \[([^\]]*)\].*", r"\1", text, flags=re.S)
    text = re.split(r"\s*\[Op:|\n|\s*Condition x|\s*\[\[", text)[0]
    text = text.replace("jpeg::Uncompress failed.", "").strip().rstrip(".")
    return text or "cannot decode"


def decode_error(path: str | Path) -> str | None:
    """Why this file cannot be used (None when it can), as a short reason for reports."""
    import tensorflow as tf

    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(max(0, Path(path).stat().st_size - 2))
            tail = f.read(2)
    except OSError as e:
        return f"cannot read the file ({e.strerror or type(e).__name__})"
    if not head:
        return "empty file"
    try:
        load_image(str(path), 8)
        return None
    except tf.errors.OpError as e:
        reason = clean_reason(getattr(e, "message", str(e)))
    if head == b"\xff\xd8" and tail != b"\xff\xd9" and TOO_LARGE not in reason:
        return "Premature end of JPEG data (truncated file)"
    if reason.startswith("Unknown image file format"):
        return "Unknown image file format (not a JPEG, PNG, GIF, BMP or WebP image)"
    return reason[:200]
