"""Every Keras model dogtl uses is built here, from plain values."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from .backbones import BackboneSpec
from .errors import DogtlError

log = logging.getLogger(__name__)


def weights_identity(weights: str) -> str:
    """What goes into fingerprints: 'imagenet', 'none' or the local file's content hash."""
    if weights in ("imagenet", "none"):
        return weights
    path = Path(weights)
    if not path.is_file():
        raise DogtlError(
            f"--weights {weights}: no such file; pass 'imagenet', 'none' or a path to a local weights file"
        )
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"file:{path.name}:sha256:{h.hexdigest()[:16]}"


def build_backbone(spec: BackboneSpec, weights: str, image_size: int):
    """The frozen backbone with global average pooling: images -> feature_dim vectors."""
    import importlib

    import keras

    module = importlib.import_module(f"keras.applications.{spec.module}")
    constructor = getattr(module, spec.constructor)
    kwargs = dict(include_top=False, pooling="avg", input_shape=(image_size, image_size, 3))
    try:
        if weights == "none":
            model = constructor(weights=None, **kwargs)
        elif weights == "imagenet":
            model = constructor(weights="imagenet", **kwargs)
        else:
            model = constructor(weights=None, **kwargs)
            model.load_weights(weights)
    except DogtlError:
        raise
    except Exception as e:  # Keras raises many types for bad files and failed downloads
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        if weights == "imagenet":
            raise DogtlError(
                f"cannot get ImageNet weights for {spec.name} ({reason}): offline? pass --weights PATH "
                "to a local weights file, or --weights none"
            ) from None
        raise DogtlError(
            f"--weights {weights}: not usable for {spec.name} without its top at {image_size} px "
            f"({reason}); pass the matching '*_notop.h5' / '.weights.h5' file"
        ) from None
    model.trainable = False
    log.info("built %s (%s weights) at %d px", spec.name, weights, image_size)
    return model


def build_head(input_dim: int, num_classes: int, hidden=(1024,), input_dropout: float = 0.5,
               dropout: float = 0.5, name: str = "head"):
    """BatchNorm -> Dropout -> [Dense relu -> Dropout]* -> softmax, on pooled features."""
    import keras
    from keras import layers

    inputs = keras.Input((input_dim,), name="features")
    x = layers.BatchNormalization(name="head_bn")(inputs)
    x = layers.Dropout(input_dropout, name="head_dropout_in")(x)
    for k, units in enumerate(hidden):
        x = layers.Dense(units, activation="relu", name=f"head_dense_{k}")(x)
        x = layers.Dropout(dropout, name=f"head_dropout_{k}")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="head_softmax")(x)
    return keras.Model(inputs, outputs, name=name)
