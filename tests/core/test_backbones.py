"""The backbone registry: every entry names a real keras.applications constructor, sizes and
blocks that fit it. The small variant of each family is built in the default run (test_extract,
test_finetune); the large ones here only with --run-slow."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from conftest import CHEAP_BACKBONES
from dogtl.core.backbones import get_backbone

MODERN = ["efficientnet_v2_b0", "efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l", "convnext_tiny",
          "convnext_small", "convnext_base", "convnext_large", "convnext_xlarge", "inception_resnet_v2",
          "nasnet_large"]
FEATURES = {"efficientnet_v2_b0": 1280, "efficientnet_v2_l": 1280, "convnext_tiny": 768, "convnext_base": 1024,
            "convnext_large": 1536, "convnext_xlarge": 2048, "inception_resnet_v2": 1536, "nasnet_large": 4032}


@pytest.mark.parametrize("name", MODERN)
def test_registry_entry_is_complete(name):
    spec = get_backbone(name)
    module = importlib.import_module(f"keras.applications.{spec.module}")
    assert callable(getattr(module, spec.constructor)) and callable(module.preprocess_input)
    assert spec.preprocessing == f"keras.applications.{spec.module}.preprocess_input"
    assert 32 <= spec.min_size <= spec.default_size
    assert len(spec.blocks) == len(set(spec.blocks)) >= 4
    assert spec.feature_dim == FEATURES.get(name, spec.feature_dim)


def _check_builds(name):
    from dogtl.core.models import block_depths, build_backbone, top_blocks_start
    from dogtl.data.images import preprocess_fn

    spec = get_backbone(name)
    size = max(spec.min_size, 64)
    model = build_backbone(spec, "none", size)
    x = preprocess_fn(spec)(np.full((1, size, size, 3), 128.0, np.float32))
    assert model(x, training=False).shape == (1, spec.feature_dim)
    names = [layer.name for layer in model.layers]
    starts = [top_blocks_start(names, spec, n) for n in range(len(spec.blocks) + 1)]
    assert starts[0] == len(names)
    assert all(a > b for a, b in zip(starts, starts[1:])), starts  # every block holds layers
    depths = block_depths(names, spec, "all")  # --trainable-blocks all: every layer in some block
    assert depths[0] == 0 and min(depths[1:]) >= 1 and depths[-1] == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in MODERN if n not in CHEAP_BACKBONES])
def test_large_modern_backbones_build_and_their_blocks_nest(name):
    _check_builds(name)
