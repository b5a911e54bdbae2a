"""Registry of frozen ImageNet backbones from keras.applications.

Only plain values live here so that `dogtl --help` never imports TensorFlow;
the Keras objects are looked up lazily by `models.build_backbone`.
"""

from __future__ import annotations

from dataclasses import dataclass
from dogtl.core.errors import SettingError


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    module: str  # keras.applications submodule holding the constructor and preprocess_input
    constructor: str
    default_size: int
    min_size: int
    feature_dim: int
    # The backbone's blocks, bottom to top, for fine-tuning (see models.top_blocks_start).
    # block_anchor "first": each entry is the name prefix of a block's layers and the block
    # starts at the first layer with that prefix (unprefixed residual layers after it belong
    # to it). "after": each entry is the exact name of a block's last layer (its output) and
    # the block starts right after the previous block's last layer.
    blocks: tuple[str, ...]
    block_anchor: str = "first"

    @property
    def preprocessing(self) -> str:
        return f"keras.applications.{self.module}.preprocess_input"


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        BackboneSpec("xception", "xception", "Xception", 299, 71, 2048,
                     tuple(f"block{i}_" for i in range(1, 15))),
        BackboneSpec("inception_v3", "inception_v3", "InceptionV3", 299, 75, 2048,
                     tuple(f"mixed{i}" for i in range(11)), block_anchor="after"),
        BackboneSpec("resnet50", "resnet50", "ResNet50", 224, 32, 2048,
                     ("conv1_", "conv2_", "conv3_", "conv4_", "conv5_")),
        BackboneSpec("mobilenet_v2", "mobilenet_v2", "MobileNetV2", 224, 32, 1280,
                     ("expanded_conv_",) + tuple(f"block_{i}_" for i in range(1, 17)) + ("Conv_1",)),
        BackboneSpec("efficientnet_b0", "efficientnet", "EfficientNetB0", 224, 32, 1280,
                     tuple(f"block{i}" for i in range(1, 8)) + ("top_",)),
    ]
}


def get_backbone(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise SettingError(
            f"unknown backbone {name!r}: choose one of {', '.join(sorted(BACKBONES))}"
        ) from None


def check_image_size(spec: BackboneSpec, image_size: int | None) -> int:
    """Resolve the image size, refusing sizes the backbone cannot take."""
    size = spec.default_size if image_size is None else int(image_size)
    if size < spec.min_size:
        raise SettingError(
            f"--image-size {size} is too small for {spec.name}: use at least {spec.min_size}"
        )
    return size
