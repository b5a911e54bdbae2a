"""finetune --runtime openvino from images: the frozen part below the trainable blocks runs on the
runtime, TensorFlow trains the rest on its output; before any step it is the head on the cached
features, it trains, and the saved model is the whole backbone + head."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("blocks, frozen", [(2, True), (0, False), ("all", False)])
def test_only_a_frozen_part_below_the_trainable_blocks_goes_to_the_runtime(blocks, frozen):
    """The default --trainable-blocks all leaves nothing frozen: TensorFlow trains on the images."""
    from types import SimpleNamespace

    from dogtl.core.backbones import get_backbone
    from dogtl.finetuning.frozenpart import frozen_part_source

    config = SimpleNamespace(runtime="openvino", precision="float32", trainable_blocks=blocks)
    assert (frozen_part_source(config, None, get_backbone("mobilenet_v2")) is not None) == frozen


def test_the_frozen_part_on_openvino_survives_training_in_a_process_of_its_own(stage3, tmp_path):
    """OpenVINO inferring in tf.data's thread while TensorFlow trained crashed every such run
    (SIGSEGV): the command, in a process of its own so that a crash fails this test only."""
    from dogtl.core.runtimes import installed

    if not installed("openvino"):
        pytest.skip("openvino is not installed (pip install openvino, a dogtl dependency); .ci/run installs it")
    out = tmp_path / "ft.keras"
    env = {**os.environ, "DOGTL_RUNTIME_CACHE": str(tmp_path / "runtimes"), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-m", "dogtl.cli", "finetune", "--data", str(stage3.data), "--head",
                           str(stage3.head), "--out", str(out), "--epochs", "2", "--batch-size", "8",
                           "--trainable-blocks", "1", "--runtime", "openvino", "--precision", "float32"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["frozen_part_runtime"] == "openvino" and meta["metrics"]["epochs_run"] == 2


@pytest.mark.slow
def test_frozen_part_on_openvino_trains_the_top_blocks(stage3, tmp_path):
    from dogtl.core.runtimes import installed
    from dogtl.evaluation.inference import load_image_model, predict_images
    from dogtl.finetuning.settings import FinetuneConfig
    from dogtl.finetuning.train import finetune

    if not installed("openvino"):
        pytest.skip("openvino is not installed (pip install openvino, a dogtl dependency); .ci/run installs it")
    out = tmp_path / "ft.keras"
    result = finetune(FinetuneConfig(data=str(stage3.data), head=str(stage3.head), out=str(out), epochs=2,
                                     trainable_blocks=2, patience=5, batch_size=8, optimizer="adam", schedule="constant", base_lr=1e-3,
                                     runtime="openvino",
                                     precision="float32"))
    assert result.head_difference < 1e-3  # epoch 0: the frozen part on OpenVINO reproduces the cached features
    assert result.epochs_run == 2 and result.history["loss"].notna().all()
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["frozen_part_runtime"] == "openvino" and meta["settings"]["runtime"] == "openvino"
    model, _, spec, size = load_image_model(out)
    assert model.input.shape[1:] == (48, 48, 3)  # the whole backbone + head, as from TensorFlow
    val = result.history  # the saved (best) model scores as recorded, from images on TensorFlow
    from dogtl.features.modelcache import split_paths
    from dogtl.data.folders import load_dataset
    from dogtl.core.metrics import scores
    from dogtl.features.cache import open_cache

    split = split_paths(open_cache(stage3.cache), load_dataset(stage3.data))["val"]
    probs, ok = predict_images(model, split["paths"], spec, size)
    assert ok.all()
    assert abs(scores(split["labels"], probs)["val_log_loss"] - result.after["val_log_loss"]) < 1e-3, val



def _frozen_part_setup(stage3, tmp_path):
    """train.Setup of `finetune --trainable-blocks 1 --runtime openvino` from images, and its model."""
    from dogtl.core.locks import writes
    from dogtl.core.runtimes import installed
    from dogtl.finetuning.frozenpart import FrozenPartSource
    from dogtl.finetuning.settings import FinetuneConfig
    from dogtl.finetuning.train import prepare

    if not installed("openvino"):
        pytest.skip("openvino is not installed (pip install openvino, a dogtl dependency); .ci/run installs it")

    @writes  # as finetune does: prepare locks the output
    def build():
        setup = prepare(FinetuneConfig(data=str(stage3.data), head=str(stage3.head), out=str(tmp_path / "ft.keras"),
                                       trainable_blocks=1, runtime="openvino", precision="float32"), None)
        assert isinstance(setup.source, FrozenPartSource)
        return setup, setup.source.build(setup)
    return build()


def test_frozen_part_model_starts_above_the_trainable_blocks_from_a_cache_without_a_cut(stage3, tmp_path):
    """Found by benchmarks/faults.py: `finetune --trainable-blocks 1` with --runtime auto (OpenVINO
    here) read the cut from the head's cache, which has none (KeyError 'cut', reported as a bug)."""
    from dogtl.core.models import build_backbone
    from dogtl.features.cut import cut_tensor

    setup, (model, _, trainable, _) = _frozen_part_setup(stage3, tmp_path)
    assert "cut" not in setup.cache.fingerprint
    below_top_block = cut_tensor(build_backbone(setup.spec, setup.weights, setup.size), setup.spec, 1)
    assert tuple(model.input.shape[1:]) == tuple(below_top_block.shape[1:])
    assert trainable


@pytest.mark.slow
def test_frozen_part_runtime_is_known_before_anything_ran(stage3, tmp_path):
    """Found by benchmarks/faults.py: a rerun resumed after the last epoch (nothing to train, the
    frozen part never ran) left frozen_part_runtime out of the model's metadata."""
    setup, _ = _frozen_part_setup(stage3, tmp_path)
    assert setup.source.runtime(setup) == "openvino"
