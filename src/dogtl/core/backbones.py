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


def _convnext_blocks(model_name: str, depths: tuple[int, ...]) -> tuple[str, ...]:
    """ConvNeXt's blocks: the stem, then every block of every stage; the first block of stages
    1-3 starts with the stage's downsampling layers (Keras names them downsampling_block_0..2)."""
    blocks = [f"{model_name}_stem"]
    for stage, depth in enumerate(depths):
        for j in range(depth):
            blocks.append(f"{model_name}_downsampling_block_{stage - 1}" if stage and not j
                          else f"{model_name}_stage_{stage}_block_{j}_")
    return tuple(blocks)


def _modern() -> list[BackboneSpec]:
    """Newer keras.applications backbones (ImageNet top-1 83-87% against Xception's 79%).
    EfficientNetV2 and ConvNeXt take 0-255 pixels and normalise inside the model (their
    preprocess_input passes pixels through)."""
    effv2 = [("b0", "B0", 224, 6), ("s", "S", 384, 6), ("m", "M", 480, 7), ("l", "L", 480, 7)]
    convnext = [("tiny", 768, (3, 3, 9, 3)), ("small", 768, (3, 3, 27, 3)), ("base", 1024, (3, 3, 27, 3)),
                ("large", 1536, (3, 3, 27, 3)), ("xlarge", 2048, (3, 3, 27, 3))]
    specs = [BackboneSpec(f"efficientnet_v2_{short}", "efficientnet_v2", f"EfficientNetV2{cls}", size, 32, 1280,
                          tuple(f"block{i}" for i in range(1, stages + 1)) + ("top_",))
             for short, cls, size, stages in effv2]
    specs += [BackboneSpec(f"convnext_{size}", "convnext", f"ConvNeXt{size.capitalize().replace('Xl', 'XL')}",
                           224, 32, dim, _convnext_blocks(f"convnext_{size}", depths))
              for size, dim, depths in convnext]
    specs.append(BackboneSpec(
        "inception_resnet_v2", "inception_resnet_v2", "InceptionResNetV2", 299, 75, 1536,
        ("mixed_5b", *(f"block35_{i}_ac" for i in range(1, 11)), "mixed_6a",
         *(f"block17_{i}_ac" for i in range(1, 21)), "mixed_7a", *(f"block8_{i}_ac" for i in range(1, 10)),
         "conv_7b_ac"), block_anchor="after"))
    specs.append(BackboneSpec(
        "nasnet_large", "nasnet", "NASNetLarge", 331, 32, 4032,
        ("reduction_concat_stem_1", "reduction_concat_stem_2", *(f"normal_concat_{i}" for i in range(0, 6)),
         "reduction_concat_reduce_6", *(f"normal_concat_{i}" for i in range(7, 13)),
         "reduction_concat_reduce_12", *(f"normal_concat_{i}" for i in range(13, 19))), block_anchor="after"))
    return specs


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
        *_modern(),
    ]
}


def backbone_help() -> str:
    """The --backbone help: every backbone of the registry with its default size and feature length."""
    return ("Frozen keras.applications backbone, as name (default input size, features per image): "
            + ", ".join(f"{s.name} ({s.default_size} px, {s.feature_dim})" for s in BACKBONES.values()) + ".")


def get_backbone(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name.strip().lower()]
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
