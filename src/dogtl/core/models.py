"""Every Keras model dogtl uses is built here, from plain values."""

from __future__ import annotations

import hashlib
import importlib
import logging
from pathlib import Path

from dogtl.core.backbones import BackboneSpec
from dogtl.core.errors import DogtlError
from dogtl.core.files import file_sha256
from dogtl.core.settings import ALL_BLOCKS

# local: keras is imported inside the functions that build models, so that importing this module
# (weights_identity, block arithmetic) does not load TensorFlow.

log = logging.getLogger(__name__)
RANDOM_INIT_SEED = 1234


def weights_identity(weights: str) -> str:
    """What goes into fingerprints: 'imagenet', 'none' or the local file's content hash."""
    if weights in ("imagenet", "none"):
        return weights
    path = Path(weights)
    if not path.is_file():
        raise DogtlError(
            f"--weights {weights}: no such file; pass 'imagenet', 'none' or a path to a local weights file"
        )
    return f"file:{path.name}:sha256:{file_sha256(path)[:16]}"


def backbone_identity(spec: BackboneSpec, weights_id: str, image_size: int) -> dict:
    """What determines build_backbone's model, known without building it (which takes a second
    and reads every weight): a key for its converted copies (core/conversions.py). `weights_id`
    is weights_identity(weights), which a caller has usually computed already (fingerprints)."""
    return {"backbone": f"keras.applications.{spec.module}.{spec.constructor}(include_top=False, pooling='avg')",
            "weights": weights_id, "image_size": int(image_size)}


def build_backbone(spec: BackboneSpec, weights: str, image_size: int, input_name: str | None = None):
    """The frozen backbone with global average pooling: images -> feature_dim vectors.
    `input_name` names its input layer (else Keras numbers it per process: input_layer_3), so
    that a weights file saved from it is the same, byte for byte, in every process."""
    import keras

    module = importlib.import_module(f"keras.applications.{spec.module}")
    constructor = getattr(module, spec.constructor)
    shape = (image_size, image_size, 3)
    kwargs = dict(include_top=False, pooling="avg",
                  **({"input_tensor": keras.Input(shape, name=input_name)} if input_name else {"input_shape": shape}))
    try:
        if weights == "none":
            model = _seeded(lambda: constructor(weights=None, **kwargs))
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


def _seeded(build, seed: int = RANDOM_INIT_SEED):
    """Build with a fixed initialisation seed, so `--weights none` gives the same backbone in
    every process (a resumed extraction and a later fine-tuning see the same random weights).
    Keras's applications take no seed, so this uses Keras's documented way to make its random
    initialisers deterministic, `keras.utils.set_random_seed`; like it, this re-seeds the
    process's global Python, NumPy and TensorFlow generators (dogtl's own randomness is
    seeded explicitly and draws from none of them)."""
    import keras

    keras.utils.set_random_seed(seed)
    return build()


def build_head(input_dim: int, num_classes: int, hidden=(1024,), input_dropout: float = 0.5,
               dropout: float = 0.5, name: str = "head", seed: int = 0):
    """BatchNorm -> Dropout -> [Dense relu -> Dropout]* -> softmax, on pooled features.

    Every random layer gets its own seed derived from `seed`, so the initial weights and the
    dropout streams depend on `seed` alone: no global generator is read, and heads built at
    the same time in several threads (threaded sweep workers, Dask) need no lock.
    """
    import keras
    from keras import layers

    def dense(units, activation, layer_name):
        return layers.Dense(units, activation=activation, name=layer_name,
                            kernel_initializer=keras.initializers.GlorotUniform(seed=_layer_seed(seed, layer_name)))

    def drop(rate, layer_name):
        return layers.Dropout(rate, seed=_layer_seed(seed, layer_name), name=layer_name)

    inputs = keras.Input((input_dim,), name="features")
    x = layers.BatchNormalization(name="head_bn")(inputs)
    x = drop(input_dropout, "head_dropout_in")(x)
    for k, units in enumerate(hidden):
        x = dense(units, "relu", f"head_dense_{k}")(x)
        x = drop(dropout, f"head_dropout_{k}")(x)
    outputs = dense(num_classes, "softmax", "head_softmax")(x)
    return keras.Model(inputs, outputs, name=name)


def _layer_seed(seed: int, layer_name: str) -> int:
    """A seed for one layer: distinct per (seed, layer name), stable across processes and
    versions (a hash, not Python's salted `hash`), below 2**31 as every backend accepts."""
    digest = hashlib.sha256(f"{int(seed)}/{layer_name}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1


def set_head_precision(model, precision: str) -> None:
    """Switch the hidden Dense layers' matmuls to `precision` (float32 or bfloat16) in place;
    weights, normalisation and softmax stay float32. Heads train in bfloat16 where that is
    faster but predict and are saved in float32, so fine-tuning and prediction never depend
    on how the head was trained. Takes effect when a graph is next traced."""
    policy = {"float32": "float32", "bfloat16": "mixed_bfloat16"}[precision]
    for layer in model.layers:
        if layer.name.startswith("head_dense_"):
            layer.dtype_policy = policy


def top_blocks_start(layer_names: list[str], spec: BackboneSpec, n) -> int:
    """Index of the first layer of the backbone's top `n` blocks (len(layer_names) when n == 0;
    1, the first layer after the input, when n is 'all': the stem below the first block too).

    For Xception, n=2 gives the first layer of block13: the reference recipe's
    "freeze the first 116 layers". Everything from there up is unfrozen, including
    unprefixed residual layers inside those blocks.
    """
    blocks = spec.blocks
    if n == ALL_BLOCKS:
        return 1
    if not 0 <= n <= len(blocks):
        raise DogtlError(
            f"--trainable-blocks {n}: {spec.name} has {len(blocks)} blocks; choose 0 to {len(blocks)} or all"
        )
    if n == 0:
        return len(layer_names)
    if spec.block_anchor == "after":
        if n == len(blocks):
            return 1  # everything but the input layer
        name = blocks[-n - 1]
        matches = [i + 1 for i, layer in enumerate(layer_names) if layer == name]
    else:
        prefix = blocks[-n]
        matches = [i for i, layer in enumerate(layer_names) if layer.startswith(prefix)]
    if not matches:
        raise DogtlError(
            f"{spec.name}: no layer named like {blocks[-n - 1] if spec.block_anchor == 'after' else blocks[-n]!r} "
            "in this Keras version; fine-tuning cannot find its blocks (use --trainable-blocks 0)"
        )
    return matches[0]


def block_depths(layer_names: list[str], spec: BackboneSpec, n) -> list[int]:
    """For each layer, which of the top `n` blocks holds it, counted from the top (1: the top
    block), or 0 for a layer below them. With 'all', layers below the first block (the stem)
    are one more block, the deepest."""
    count = len(spec.blocks) if n == ALL_BLOCKS else n
    starts = [top_blocks_start(layer_names, spec, k) for k in range(1, count + 1)]
    if n == ALL_BLOCKS and (not starts or starts[-1] > 1):
        starts.append(1)
    return [next((k for k, start in enumerate(starts, 1) if start <= i), 0) for i in range(len(layer_names))]


def is_batchnorm(layer) -> bool:
    from keras import layers

    return isinstance(layer, layers.BatchNormalization)


def unfreeze_top_blocks(backbone, spec: BackboneSpec, n) -> list[str]:
    """Make the top `n` blocks (or 'all') trainable, all else frozen; BatchNorm always stays frozen.

    Keras 3 runs a frozen BatchNormalization layer in inference mode (moving statistics)
    even inside `fit`, which is what keeps fine-tuning from wrecking the features. The
    caller must compile after this. Returns the names of layers with trainable weights.
    """
    names = [layer.name for layer in backbone.layers]
    start = top_blocks_start(names, spec, n)
    backbone.trainable = True
    for i, layer in enumerate(backbone.layers):
        layer.trainable = i >= start and not is_batchnorm(layer)
    if not any(layer.trainable for layer in backbone.layers):
        backbone.trainable = False
    return [layer.name for layer in backbone.layers if layer.trainable and layer.trainable_weights]


def freeze_batchnorm(model) -> None:
    """Freeze every BatchNormalization layer, nested models included (inference mode in fit)."""
    for layer in batchnorm_layers(model):
        layer.trainable = False


def compose(parts, head, name: str = "finetuned", input_names=None):
    """inputs -> each part (a backbone with its global average pooling, or the top part of one
    above a cut, features/cut.py) -> their pooled features, concatenated in order when there are
    several -> the head model object itself. The one way dogtl puts a head on a backbone.

    Using the trained head object (not a copy of its architecture) carries its weights over
    exactly, so before any training step the composed model equals the head on cached features.
    `parts`: one Keras model or a list; each gets an input of its own input's shape, named by
    `input_names` (default: 'image' for one part). Several parts are a multi-backbone head's
    backbones, in the order of its caches, fed a tuple of inputs (see data.multiimages and
    `input_name`).
    """
    import keras

    several = isinstance(parts, (list, tuple))
    parts = list(parts) if several else [parts]
    names = list(input_names) if input_names is not None else ["image"] * len(parts)
    total = sum(part.output.shape[-1] for part in parts)
    head_dim = head.input.shape[-1] if not isinstance(head.input, list) else head.input[0].shape[-1]
    if head_dim != total and several:
        raise DogtlError(f"the head takes {head_dim} features but its backbones give {total}: "
                         "the head was trained on other caches")
    if head_dim != total:
        raise DogtlError(
            f"the head takes {head_dim} features but {parts[0].name} gives {total}: "
            "the head was trained on another backbone; train a head on this backbone's cache"
        )
    inputs = [keras.Input(tuple(part.input.shape[1:]), name=n) for part, n in zip(parts, names)]
    features = [part(x, training=False) for part, x in zip(parts, inputs)]
    if several:
        outputs = head(keras.layers.Concatenate(name="features_concat")(features))
    else:
        inputs, outputs = inputs[0], head(features[0])
    return keras.Model(inputs, outputs, name=name)


def fold_temperature(model, temperature: float) -> None:
    """Make `model` output softmax(logits / temperature), exactly, by dividing the kernel and bias of
    the Dense softmax layer that ends it (a head's `head_softmax`, nested or not): no layer is
    added, so every export and runtime takes the model as before."""
    import keras

    layer = model.layers[-1]
    while not isinstance(layer, keras.layers.Dense) and getattr(layer, "layers", None):
        layer = layer.layers[-1]
    if not isinstance(layer, keras.layers.Dense) or getattr(layer.activation, "__name__", "") != "softmax":
        raise DogtlError(f"{model.name} does not end in a Dense softmax layer: no temperature can be folded into it")
    for weight in (layer.kernel, layer.bias) if layer.use_bias else (layer.kernel,):
        weight.assign(keras.ops.convert_to_numpy(weight) / temperature)


def calibrate_batchnorm(model, images) -> None:
    """Set every BatchNorm layer's moving statistics to those of `images` (one forward pass).

    A randomly initialised backbone keeps BatchNorm's initial statistics (mean 0, variance 1),
    so its activations shrink layer after layer and its features are near-constant. With the
    statistics of real (preprocessed) images every layer is normalised and random features
    carry signal: used for the offline demo and the tests, never for ImageNet weights.
    """
    reestimate_batchnorm(model, [images])


def batchnorm_layers(model) -> list:
    """Every BatchNormalization layer of `model`, nested models included."""
    found = []
    for layer in getattr(model, "layers", []):
        found.extend([layer] if is_batchnorm(layer) else batchnorm_layers(layer))
    return found


def reestimate_batchnorm(model, batches, layers=None) -> None:
    """Set the moving statistics of `layers` (default: every BatchNorm layer of `model`) to their
    average over `batches` of inputs, the way torch's `update_bn` does for SWA: each batch runs
    with those layers normalising by the batch's own statistics (the other BatchNorm layers by
    their moving ones), and batch k enters the moving averages with momentum (k - 1) / k, an
    exact running mean. Every layer's `trainable` flag is as before afterwards."""
    layers = batchnorm_layers(model) if layers is None else list(layers)
    flags = [(layer, layer.trainable) for layer in _preorder(model)]
    momentums = [(layer, layer.momentum) for layer in layers]
    chosen = {id(layer) for layer in layers}
    try:
        model.trainable = True  # recursive: a frozen BatchNorm (or model around it) runs in inference mode
        for layer in batchnorm_layers(model):
            layer.trainable = id(layer) in chosen
        for k, batch in enumerate(batches, 1):
            for layer in layers:
                layer.momentum = (k - 1) / k
            model(batch, training=True)
    finally:
        for layer, momentum in momentums:
            layer.momentum = momentum
        for layer, trainable in flags:  # parents first: setting a model's flag sets its layers'
            layer.trainable = trainable


def _preorder(model) -> list:
    """`model` and every layer in it, nested ones included, each model before its layers."""
    found = [model]
    for layer in getattr(model, "layers", []):
        found.extend(_preorder(layer) if hasattr(layer, "layers") else [layer])
    return found


def input_name(k: int, spec: BackboneSpec, image_size: int) -> str:
    """The name of a multi-backbone model's k-th image input (compose's `input_names`), e.g.
    'image_0_mobilenet_v2_96'."""
    return f"image_{k}_{spec.name}_{image_size}"


def renamed(model, name: str):
    """A copy of a functional Keras model under another name, same weights (Keras needs distinct
    names for models nested side by side: ensemble members, two backbones of one architecture)."""
    config = model.get_config()
    config["name"] = name
    copy = model.__class__.from_config(config)
    copy.set_weights(model.get_weights())
    copy.trainable = model.trainable
    return copy
