"""The reference recipe's augmentation as one random affine warp per image.

Every random number comes from stateless ops seeded by (seed, pass, key), the key being a
function of the image's id (`image_keys`), so the augmented pass p of an image is the same in
a resumed, sharded, incremental or repeated run, wherever the image is in the file list.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import asdict

import numpy as np

from dogtl.core.errors import SettingError
from dogtl.core.settings import Setting, settings_class

AUGMENT_SETTINGS = (
    Setting("rotation", "float", 45.0, "Augmentation: max rotation in degrees.", low=0),  # uniform in [-r, r]
    Setting("zoom", "float", 0.25, "Augmentation: max zoom in or out, as a fraction.", low=0, high=1,
            high_open=True),  # scale factor uniform in [1 - zoom, 1 + zoom]
    Setting("shift", "float", 0.2, "Augmentation: max shift, as a fraction of width/height.", low=0),
    Setting("hflip", "bool", True, "Augmentation: random horizontal flips."),
)

AugmentConfig = settings_class(
    "AugmentConfig", AUGMENT_SETTINGS, "One random affine warp per image (AUGMENT_SETTINGS): the reference recipe's "
    "by default; recorded in the cache's fingerprint.", {"as_dict": asdict, "__module__": __name__})


def image_keys(ids):
    """The augmentation key of each image id: 63 bits of its SHA-256, as int64 (cache format 2;
    format-1 caches used the image's number in the file list, which moves when images are added)."""
    return np.array([int.from_bytes(hashlib.sha256(str(i).encode()).digest()[:8], "big") >> 1 for i in ids],
                    dtype=np.int64)


# --augment presets (finetuning): light keeps a garment a garment and a digit a digit; the
# reference recipe's 45 degree rotations and strong zooms hurt many domains other than dogs.
LIGHT = dict(rotation=10.0, zoom=0.1, shift=0.1)


def _warp_text(c) -> str:
    return f"rotation {c['rotation']:g} degrees, zoom {c['zoom']:g}, shift {c['shift']:g}"


AUGMENT_PRESETS = {  # name: what it is (the --augment help is made from this)
    "none": "no augmentation",
    "light": f"{_warp_text(LIGHT)}, flips as at extraction",
    "recipe": f"the reference recipe's: {_warp_text(AugmentConfig().as_dict())}, flips",
    "cache": "the cache's settings",
}


def augment_preset(name: str, cached: AugmentConfig) -> AugmentConfig | None:
    """The augmentation `--augment name` means: none (None), light (LIGHT, flips as `cached`, the
    extraction's: whether a mirror image keeps its label is a property of the data), recipe (the
    reference recipe's, AugmentConfig()) or cache (`cached` itself)."""
    presets = {"none": None, "light": AugmentConfig(**LIGHT, hflip=cached.hflip), "recipe": AugmentConfig(),
               "cache": cached}
    if name not in presets:
        raise SettingError(f"--augment {name!r}: choose one of {', '.join(presets)}")
    return presets[name]


def image_seed(seed: int, pass_index, index):
    """A stateless-op seed that depends only on (seed, pass, image key)."""
    import tensorflow as tf  # local: importing dogtl.data (the CLI's option checks) starts no TensorFlow

    base = tf.stack([tf.cast(seed, tf.int64), tf.cast(pass_index, tf.int64)])
    return tf.random.experimental.stateless_fold_in(base, tf.cast(index, tf.int64))


def augment(image, config: AugmentConfig, seed):
    """Randomly rotate, zoom, shift and flip one float image [H, W, C] (edges repeat)."""
    import tensorflow as tf  # local: importing dogtl.data (the CLI's option checks) starts no TensorFlow

    u = tf.random.stateless_uniform([5], seed=seed, minval=-1.0, maxval=1.0)
    height = tf.cast(tf.shape(image)[0], tf.float32)
    width = tf.cast(tf.shape(image)[1], tf.float32)
    angle = u[0] * (config.rotation * math.pi / 180.0)
    scale = 1.0 + u[1] * config.zoom
    tx, ty = u[2] * config.shift * width, u[3] * config.shift * height
    flip = tf.where(u[4] < 0.0, -1.0, 1.0) if config.hflip else tf.constant(1.0)
    # Output pixel p samples input q = A (p - centre - t) + centre, with A = flip * R(-angle) / scale.
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    a00, a01, a10, a11 = flip * cos, flip * sin, -sin, cos
    cx, cy = (width - 1.0) / 2.0, (height - 1.0) / 2.0
    ox, oy = cx + tx, cy + ty
    return _warp_fn()(image, tf.stack([a00, a01, cx - a00 * ox - a01 * oy, a10, a11, cy - a10 * ox - a11 * oy]))


@functools.cache
def _warp_fn():
    """Bilinear affine warp, edges repeated: TF's ImageProjectiveTransformV3 (BILINEAR, fill
    NEAREST) to float rounding, compiled by XLA into one fused loop. That op costs ~4 ms of CPU per
    299 px image, as much as 3% of the backbone's forward on a 2-core CPU, which extraction has
    to share with it; this costs ~1 ms (benchmarks/bench_extract.py)."""
    import tensorflow as tf  # local: importing dogtl.data (the CLI's option checks) starts no TensorFlow

    @tf.function(jit_compile=True)
    def warp(image, t):
        # Output pixel (x, y) samples the input at (t0 x + t1 y + t2, t3 x + t4 y + t5), clamped to the image.
        shape = tf.shape(image)
        height, width = shape[0], shape[1]
        xs = tf.cast(tf.range(width), tf.float32)[None, :]
        ys = tf.cast(tf.range(height), tf.float32)[:, None]
        qx = tf.clip_by_value(t[0] * xs + t[1] * ys + t[2], 0.0, tf.cast(width - 1, tf.float32))
        qy = tf.clip_by_value(t[3] * xs + t[4] * ys + t[5], 0.0, tf.cast(height - 1, tf.float32))
        x0, y0 = tf.floor(qx), tf.floor(qy)
        fx, fy = (qx - x0)[..., None], (qy - y0)[..., None]
        x0, y0 = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)
        x1, y1 = tf.minimum(x0 + 1, width - 1), tf.minimum(y0 + 1, height - 1)
        pixels = tf.reshape(image, [-1, shape[2]])

        a, b, c, d = (tf.gather(pixels, y * width + x) for y, x in ((y0, x0), (y0, x1), (y1, x0), (y1, x1)))
        top, bottom = a + fx * (b - a), c + fx * (d - c)
        return top + fy * (bottom - top)

    return warp
