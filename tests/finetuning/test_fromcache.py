"""finetune --from-cache: trains the top blocks + head on the cached cut activations; before
its first step it is the head on the cached features; the saved model is the whole backbone +
head with the frozen part bit-identical; --trainable-blocks must match the cut; resume after kill -9."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_clean_error, run_cli


SETTINGS = dict(epochs=2, patience=5, batch_size=8, optimizer="adam", schedule="constant", base_lr=1e-3,
                trainable_blocks=2)


def _config(pipeline, out, **kw):
    from dogtl.finetuning.settings import FinetuneConfig

    return FinetuneConfig(data=str(pipeline.data), head=str(pipeline.head), out=str(out), from_cache=True,
                          **{**SETTINGS, **kw})


@pytest.fixture(scope="module")
def from_cache(cut_stage3, tmp_path_factory):
    from dogtl.finetuning.train import finetune

    out = tmp_path_factory.mktemp("fromcache") / "ft.keras"
    return finetune(_config(cut_stage3, out))


def test_before_its_first_step_it_is_the_head_on_cached_features(cut_stage3):
    from dogtl.core.artifacts import load_model
    from dogtl.features.cache import open_cache
    from dogtl.core.locks import writes
    from dogtl.features.cut import CutReader
    from dogtl.finetuning.fromcache import prepare_from_cache

    setup = writes(prepare_from_cache)(_config(cut_stage3, cut_stage3.root / "unused.keras"), None)
    model, head, trainable, _ = setup.source.build(setup)
    assert trainable and all("block_15_" in n or "block_16_" in n or n.startswith("Conv_1") for n in trainable)
    cache = open_cache(cut_stage3.cache)
    val = np.flatnonzero(cache.is_val)
    want = load_model(cut_stage3.head, compile=False)[0].predict(cache.features("labelled", [0])[0][val], verbose=0)
    got = model.predict(CutReader(cache).read("labelled", 0, val), verbose=0)
    np.testing.assert_allclose(got, want, atol=2e-3)  # float16 cut activations, float32 features
    assert not any(layer.trainable for layer in model.get_layer("top_part").layers
                   if layer.__class__.__name__ == "BatchNormalization")


def test_saved_model_is_the_backbone_plus_head_with_the_frozen_part_bit_identical(cut_stage3, from_cache):
    from dogtl.features.modelcache import split_paths
    from dogtl.core.models import build_backbone, top_blocks_start
    from dogtl.data.folders import load_dataset
    from dogtl.core.metrics import scores
    from dogtl.evaluation.inference import load_image_model, predict_images
    from dogtl.core.backbones import get_backbone
    from dogtl.features.cache import open_cache

    r = from_cache
    assert r.epochs_run == 2 and r.head_difference < 2e-3 and r.after["val_log_loss"] <= r.before["val_log_loss"]
    assert json.loads(r.model_path.with_suffix(".json").read_text())["kind"] == "finetuned"
    model, meta, spec, size = load_image_model(r.model_path)  # as predict and evaluate load it
    fresh = build_backbone(get_backbone("mobilenet_v2"), str(cut_stage3.weights), 48)
    saved = next(layer for layer in model.layers if layer.name == fresh.name)
    start = top_blocks_start([layer.name for layer in fresh.layers], spec, 2)
    for layer in fresh.layers[:start]:
        for a, b in zip(layer.get_weights(), saved.get_layer(layer.name).get_weights() if layer.weights else []):
            assert np.array_equal(a, b), layer.name  # the frozen part, bit for bit
    changed = [layer.name for layer in fresh.layers[start:] if layer.get_weights() and not all(
        np.array_equal(a, b) for a, b in zip(layer.get_weights(), saved.get_layer(layer.name).get_weights()))]
    assert bool(changed) == (r.best_epoch > 0)
    assert all(w.dtype == "float32" for w in model.weights)
    # on the images, the saved model scores what it scored on the cut activations
    val = split_paths(open_cache(cut_stage3.cache), load_dataset(cut_stage3.data))["val"]
    probs, ok = predict_images(model, val["paths"], spec, size)
    assert ok.all()
    assert scores(val["labels"], probs)["val_log_loss"] == pytest.approx(r.after["val_log_loss"], abs=5e-3)


def test_trainable_blocks_must_be_at_most_the_cut(cut_stage3, stage3, tmp_path):
    for blocks in (3, "all"):
        result = run_cli("finetune", "--from-cache", "--data", cut_stage3.data, "--head", cut_stage3.head,
                         "--out", tmp_path / "ft.keras", "--trainable-blocks", blocks)
        assert_clean_error(result, f"--trainable-blocks {blocks}", "top 2 blocks", "run with --trainable-blocks 2 or fewer")
    result = run_cli("finetune", "--from-cache", "--data", stage3.data, "--head", stage3.head,
                     "--out", tmp_path / "ft.keras")
    assert_clean_error(result, "no cut activations", "--cut-blocks all")  # the default --trainable-blocks


# A real kill -9: the CLI in a subprocess SIGKILLs itself right after committing epoch 1.
HARNESS = r'''
import os, signal, sys
from dogtl.finetuning import checkpoints

commit = checkpoints.Checkpoints.commit

def killing_commit(self, state):
    commit(self, state)
    if state.epoch == 1 and os.environ.get("DOGTL_TEST_KILL"):
        os.kill(os.getpid(), signal.SIGKILL)

checkpoints.Checkpoints.commit = killing_commit
from dogtl.cli import app
app(sys.argv[1:], prog_name="dogtl")
'''


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_uninterrupted_run(cut_stage3, from_cache, tmp_path):
    harness = tmp_path / "harness.py"
    harness.write_text(HARNESS)
    out = tmp_path / "ft.keras"
    args = ["finetune", "--from-cache", "--data", cut_stage3.data, "--head", cut_stage3.head, "--out", out,
            *[x for k, v in SETTINGS.items() for x in (f"--{k.replace('_', '-')}", v)]]

    def run(kill):
        env = dict(os.environ, DOGTL_TEST_KILL=kill, TF_CPP_MIN_LOG_LEVEL="3")
        return subprocess.run([sys.executable, str(harness), *map(str, args)], env=env, capture_output=True,
                              text=True, timeout=300)

    killed = run("1")
    assert killed.returncode == -9, killed.stderr
    partial = out.with_name(out.name + ".partial")
    assert json.loads((partial / "state.json").read_text())["state"]["epoch"] == 1 and not out.exists()
    resumed = run("")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after epoch 1" in resumed.stdout and out.exists() and not partial.exists()
    history = json.loads(out.with_suffix(".json").read_text())["metrics"]
    assert history["epochs_run"] == 2
    assert history["val_log_loss"] == pytest.approx(from_cache.after["val_log_loss"], rel=1e-4)


@pytest.fixture(scope="module")
def cut_all(tmp_path_factory):
    """`stage3`'s pipeline with the cache holding the cut at 'all' (the preprocessed images)."""
    from _stage3 import build_pipeline

    return build_pipeline(tmp_path_factory.mktemp("cut_all"), cut_blocks="all")


@pytest.mark.parametrize("which, blocks, top", [("two", 1, ["Conv_1"]), ("all", 3, ["block_15_expand"]),
                                                ("all", "all", ["Conv1", "expanded_conv_depthwise"])])
def test_any_depth_up_to_the_cut_starts_as_the_head_on_cached_features(cut_stage3, cut_all, which, blocks, top):
    """Below the cut, the blocks between it and the trained ones run frozen; with the cut at 'all'
    the cache holds the images themselves and any depth trains from it."""
    from dogtl.core.locks import writes
    from dogtl.features.cache import open_cache
    from dogtl.features.cut import CutReader
    from dogtl.finetuning.fromcache import prepare_from_cache

    pipeline = cut_stage3 if which == "two" else cut_all
    setup = writes(prepare_from_cache)(_config(pipeline, pipeline.root / "unused.keras", trainable_blocks=blocks), None)
    model, head, trainable, _ = setup.source.build(setup)
    assert trainable[:len(top)] == top
    cache = open_cache(pipeline.cache)
    assert cache.fingerprint["cut"]["blocks"] == (2 if which == "two" else "all")
    val = np.flatnonzero(cache.is_val)
    want = head.predict(cache.features("labelled", [0])[0][val], verbose=0)
    got = model.predict(CutReader(cache).read("labelled", 0, val), verbose=0)
    # float16 images through every layer of a random backbone: rounding grows (a wrong cut or head: ~0.3)
    np.testing.assert_allclose(got, want, atol=2e-3 if which == "two" else 2e-2)


def test_batchnorm_reestimation_changes_the_unfrozen_blocks_statistics_only(cut_all, tmp_path):
    """Epoch 0 stays the untouched head (the model to beat); training starts from the model whose
    unfrozen blocks' and head's BatchNorm statistics are those of the new images."""
    from dogtl.core.locks import writes
    from dogtl.core.models import batchnorm_layers, block_depths, build_backbone
    from dogtl.finetuning.fromcache import prepare_from_cache
    from dogtl.finetuning.train import start

    setup = writes(prepare_from_cache)(_config(cut_all, tmp_path / "ft.keras", trainable_blocks=3,
                                               batchnorm="reestimate"), None)
    events = []
    model, state = start(setup, events.append)
    assert state.best_file == "epoch-0000.keras" and state.last_file == "epoch-0000-batchnorm.keras"
    assert events and events[0].line().startswith("batchnorm statistics of 8 layers re-estimated")  # 1 + 3 + 3 + head_bn
    fresh = build_backbone(setup.spec, setup.weights, setup.size)
    depths = dict(zip([l.name for l in fresh.layers], block_depths([l.name for l in fresh.layers], setup.spec, 3)))
    trained = {l.name: l for l in batchnorm_layers(model)}
    for layer in batchnorm_layers(fresh):
        same = np.array_equal(layer.moving_mean.numpy(), trained[layer.name].moving_mean.numpy())
        assert same == (depths[layer.name] == 0), layer.name
    head_bn = trained["head_bn"]
    original = setup.checkpoints.load_model(state.best_file, state).get_layer("head").get_layer("head_bn")
    assert not np.allclose(head_bn.moving_variance.numpy(), original.moving_variance.numpy())


def test_every_option_together_from_an_all_cut(cut_all, tmp_path):
    """The whole backbone from the cached images with every new option: it runs, reports, keeps
    the best epoch (never worse than the head) and saves the whole backbone + head."""
    from dogtl.finetuning.train import finetune

    events = []
    r = finetune(_config(cut_all, tmp_path / "ft.keras", trainable_blocks="all", optimizer="adamw",
                         schedule="one_cycle", max_lr=3e-3, block_lr_decay=0.7, unfreeze_every=1,
                         label_smoothing=0.1, weight_decay=0.01, batchnorm="reestimate", augment="cache"),
                 progress=events.append)
    lines = [e.line() for e in events if e.line() is not None]  # the batchnorm line and one per epoch
    assert r.epochs_run == 2 and len(lines) == 3 and r.after["val_log_loss"] <= r.before["val_log_loss"]
    assert "Conv1" in r.trainable_layers and r.history["lr"].iloc[-1] < r.history["lr"].iloc[0]
    meta = json.loads(r.model_path.with_suffix(".json").read_text())
    assert meta["settings"]["trainable_blocks"] == "all" and meta["settings"]["block_lr_decay"] == 0.7
