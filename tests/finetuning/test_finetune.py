"""Stage three: composition, block unfreezing, augmentation, resume, never-worse, options, --config, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from _stage3 import copy_head
from conftest import CHEAP_BACKBONES, assert_clean_error, run_cli

from dogtl.core.backbones import get_backbone
from dogtl.core.errors import DogtlError


@pytest.fixture(scope="module")
def xception():
    from dogtl.core.models import build_backbone

    return build_backbone(get_backbone("xception"), "none", 71)


def test_xception_top_two_blocks_are_the_recipes_first_116_layers_frozen(xception):
    from dogtl.core.models import is_batchnorm, unfreeze_top_blocks

    trainable = unfreeze_top_blocks(xception, get_backbone("xception"), 2)
    layers = xception.layers
    recipe = [l.name for l in layers[116:] if l.weights and not is_batchnorm(l)]
    assert trainable == recipe
    assert trainable[0] == "block13_sepconv1" and trainable[-1] == "block14_sepconv2"
    assert any(not l.name.startswith("block") for l in layers[116:] if l.name in trainable)  # block13's residual conv
    assert not any(l.trainable for l in layers[:116])
    assert all(not l.trainable for l in layers if is_batchnorm(l))
    assert {v.name for v in xception.trainable_variables} == {
        v.name for l in layers[116:] if not is_batchnorm(l) for v in l.trainable_weights}

    every = unfreeze_top_blocks(xception, get_backbone("xception"), "all")
    assert every[0] == "block1_conv1" and every == [l.name for l in layers if l.weights and not is_batchnorm(l)]
    assert unfreeze_top_blocks(xception, get_backbone("xception"), 0) == []
    assert xception.trainable_variables == []
    with pytest.raises(DogtlError, match="choose 0 to 14 or all"):
        unfreeze_top_blocks(xception, get_backbone("xception"), 15)


@pytest.mark.parametrize("name", sorted(set(CHEAP_BACKBONES) - {"xception"}))
def test_every_backbone_block_is_found_and_blocks_nest(name):
    """Every number of top blocks up to all, for each cheap backbone (the others: tests/features/
    test_backbones.py --run-slow builds them)."""
    import importlib

    from dogtl.core.models import block_depths, top_blocks_start

    spec = get_backbone(name)
    module = importlib.import_module(f"keras.applications.{spec.module}")
    model = getattr(module, spec.constructor)(weights=None, include_top=False, pooling="avg",
                                              input_shape=(spec.min_size,) * 2 + (3,))
    names = [l.name for l in model.layers]
    starts = [top_blocks_start(names, spec, n) for n in range(len(spec.blocks) + 1)] + [
        top_blocks_start(names, spec, "all")]
    assert starts[0] == len(names) and starts[-1] == 1  # all: every layer but the input
    assert all(a > b for a, b in zip(starts[:-1], starts[1:-1])) and starts[-2] >= 1, starts  # every block holds layers
    depths = block_depths(names, spec, "all")  # discriminative rates: each layer's block, from the top
    assert depths[0] == 0 and all(d >= 1 for d in depths[1:]) and depths[-1] == 1
    assert all(a >= b for a, b in zip(depths[1:], depths[2:]))
    assert max(depths) == len(spec.blocks) + (starts[-2] > 1)  # the stem is one more block when it exists
    if name == "inception_v3":  # Keras' own InceptionV3 fine-tuning example: freeze the first 249 layers
        assert names[starts[2] - 1] == "mixed8" and starts[2] == 249


def test_composed_model_equals_head_on_cached_features_before_training(stage3):
    """backbone -> pooling -> head object, on clean images == head on the float32 cache."""
    from dogtl.core.artifacts import load_model
    from dogtl.features.cache import open_cache
    from dogtl.data.folders import load_dataset
    from dogtl.core.models import build_backbone, compose
    from dogtl.features.modelcache import split_paths
    from dogtl.evaluation.inference import predict_images

    spec = get_backbone("mobilenet_v2")
    head, meta = load_model(stage3.head, compile=False)
    cache = open_cache(stage3.cache)
    model = compose(build_backbone(spec, str(stage3.weights), meta.backbones[0].image_size), head)
    split = split_paths(cache, load_dataset(stage3.data))
    cached = head.predict(cache.features("labelled", passes=[0])[0], verbose=0)
    for part in ("train", "val"):
        probs, ok = predict_images(model, split[part]["paths"], spec, meta.backbones[0].image_size, batch_size=5)
        assert ok.all()
        assert np.max(np.abs(probs - cached[split[part]["rows"]])) <= 1e-4
    assert cached.std(axis=0).max() > 1e-3  # the features carry signal: the check is not vacuous


def test_epoch_e_is_the_caches_augmented_pass_1_plus_e(stage3):
    from dogtl.data.augment import AugmentConfig
    from dogtl.features.cache import open_cache
    from dogtl.data.folders import load_dataset
    from dogtl.finetuning.data import training_batches
    from dogtl.core.models import build_backbone
    from dogtl.features.modelcache import split_paths

    spec = get_backbone("mobilenet_v2")
    cache = open_cache(stage3.cache)
    train = split_paths(cache, load_dataset(stage3.data))["train"]
    aug = AugmentConfig(**cache.fingerprint["augmentation"])
    ds = training_batches(train["paths"], train["indices"], spec, 48, seed=cache.fingerprint["seed"],
                          augmentation=aug, batch_size=32, epochs=[0, 1])
    backbone = build_backbone(spec, str(stage3.weights), 48)
    (rows0, images0), (rows1, images1) = [(r.numpy(), im) for r, im in ds]
    cached_pass1 = cache.features("labelled", passes=[1])[0][train["rows"]]
    assert sorted(rows0) == list(range(len(train["paths"])))
    assert np.max(np.abs(backbone.predict(images0, verbose=0) - cached_pass1[rows0])) <= 1e-4
    assert not np.array_equal(rows0, rows1)  # reshuffled each epoch
    by_row0 = dict(zip(rows0, images0.numpy()))
    assert all(np.abs(by_row0[r] - im).mean() > 1e-2 for r, im in zip(rows1, images1.numpy()))  # fresh augmentation


def test_finetune_writes_model_metadata_history_and_plot(stage3, finetuned):
    from dogtl.core.artifacts import load_model
    from dogtl.core.models import is_batchnorm

    r = finetuned
    assert r.model_path.exists() and r.history_path.exists()
    assert r.head_difference <= 1e-4
    meta = json.loads(r.model_path.with_suffix(".json").read_text())
    head_meta = json.loads(stage3.head.with_suffix(".json").read_text())
    assert meta["kind"] == "finetuned" and meta["head"] == str(stage3.head)
    for key in ("classes", "backbone", "weights", "image_size", "preprocessing", "feature_dim", "cache",
                "cache_fingerprint"):
        assert meta[key] == head_meta[key], key
    assert meta["settings"]["trainable_blocks"] == 2 and meta["settings"]["base_lr"] == 1e-4
    assert meta["settings"]["weights"] is None and meta["weights_path"] == str(stage3.weights.resolve())
    assert meta["metrics"]["before"] == r.before and meta["metrics"]["val_log_loss"] == r.after["val_log_loss"]
    assert r.trainable_layers == ["block_16_expand", "block_16_depthwise", "block_16_project", "Conv_1"]
    assert r.after["val_log_loss"] <= r.before["val_log_loss"]
    history = pd.read_csv(r.history_path)
    assert list(history.columns) == ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr"]
    assert history["epoch"].tolist() == [1] and history["lr"].iloc[0] == pytest.approx(1e-4)
    assert r.plot_path is not None and r.plot_path.exists()
    assert not r.model_path.with_name(r.model_path.name + ".partial").exists()

    model, _ = load_model(r.model_path, compile=False)
    backbone = next(l for l in model.layers if hasattr(l, "layers"))
    assert all(not l.trainable for l in backbone.layers if is_batchnorm(l))
    assert sorted(l.name for l in backbone.layers if l.trainable and l.weights) == sorted(r.trainable_layers)


def test_the_defaults_train_the_whole_backbone_with_the_measured_recipe(stage3, tmp_path):
    """No options: every layer with weights trains (the stem too), AdamW, a warm-up epoch then a
    cosine down to --base-lr, no augmentation, the kept model calibrated."""
    from dogtl.core.artifacts import load_model
    from dogtl.core.metrics import scores
    from dogtl.data.folders import load_dataset
    from dogtl.evaluation.inference import predict_images
    from dogtl.features.cache import open_cache
    from dogtl.features.modelcache import split_paths
    from dogtl.finetuning.settings import FinetuneConfig
    from dogtl.finetuning.train import finetune

    r = finetune(FinetuneConfig(data=str(stage3.data), head=str(stage3.head), out=str(tmp_path / "ft.keras"),
                                epochs=2, batch_size=8))
    meta = json.loads(r.model_path.with_suffix(".json").read_text())
    assert meta["settings"]["trainable_blocks"] == "all" and r.trainable_layers[0] == "Conv1"
    assert (meta["settings"]["optimizer"], meta["settings"]["schedule"]) == ("adamw", "cosine")
    base, peak = meta["settings"]["base_lr"], meta["settings"]["max_lr"]
    assert r.history["lr"].tolist() == pytest.approx([peak, base], rel=1e-4)  # 3 steps per epoch: warm-up, cosine
    assert meta["settings"]["augment"] == "none" and meta["augmentation"] is None
    assert r.after["val_log_loss"] <= r.before["val_log_loss"]
    # calibrated: judged at its temperature, saved with it folded in, so it scores what it was judged by
    assert meta["settings"]["calibrate"] and r.after["val_log_loss"] <= r.after["raw_val_log_loss"]
    assert r.history["val_loss"].min() == pytest.approx(r.after["val_log_loss"]) or r.best_epoch == 0
    model, _ = load_model(r.model_path, compile=False)
    val = split_paths(open_cache(stage3.cache), load_dataset(stage3.data))["val"]
    probs, _ = predict_images(model, val["paths"], get_backbone("mobilenet_v2"), 48)
    assert scores(val["labels"], probs)["val_log_loss"] == pytest.approx(r.after["val_log_loss"], abs=1e-4)
    assert r.after["temperature"] != pytest.approx(1.0, abs=1e-3)


def _config(stage3, out, **kw):
    from dogtl.finetuning.settings import FinetuneConfig, recipe_settings

    return FinetuneConfig(data=str(stage3.data), head=str(stage3.head), out=str(out),
                          weights=str(stage3.weights), **{**recipe_settings("reference"), "batch_size": 8, **kw})


def test_killed_run_resumes_after_last_finished_epoch(stage3, tmp_path):
    from dogtl.finetuning.train import finetune
    from dogtl.core.schedules import cyclic_lr

    out = tmp_path / "ft.keras"
    seen = []

    def killer(event):
        if event.unit != "images":
            return
        seen.append(event.done)
        if len(seen) == 4:  # 18 train images / 8 = 3 steps per epoch: step 1 of epoch 2
            raise KeyboardInterrupt

    cyclic = dict(epochs=2, patience=5, schedule="triangular", base_lr=1e-4, max_lr=1e-3, step_size=2)
    with pytest.raises(KeyboardInterrupt):
        finetune(_config(stage3, out, **cyclic), progress=killer)
    partial = out.with_name(out.name + ".partial")
    state = json.loads((partial / "state.json").read_text())["state"]
    assert state["epoch"] == 1 and not out.exists()
    first = state["history"][0]
    with pytest.raises(DogtlError, match="unfinished fine-tuning with other settings"):
        finetune(_config(stage3, out, **{**cyclic, "base_lr": 2e-4}))

    r = finetune(_config(stage3, out, **cyclic))
    assert r.resumed_from == 1 and r.epochs_run == 2
    assert r.history["epoch"].tolist() == [1, 2]
    assert r.history.iloc[0].to_dict() == pytest.approx(first)
    # the schedule continues from the restored iteration count (3 steps per epoch)
    assert r.history["lr"].tolist() == pytest.approx([cyclic_lr(3, 1e-4, 1e-3, 2), cyclic_lr(6, 1e-4, 1e-3, 2)])
    assert out.exists() and not partial.exists()


def test_cli_never_saves_worse_than_the_head_and_stops_early(stage3, tmp_path):
    """A learning rate that wrecks the model: early stopping, and the saved model is the head itself."""
    from dogtl.core.artifacts import load_model
    from dogtl.features.cache import open_cache
    from dogtl.data.folders import load_dataset
    from dogtl.features.modelcache import split_paths
    from dogtl.evaluation.inference import predict_images

    out = tmp_path / "ft.keras"
    result = run_cli("finetune", "--data", stage3.data, "--head", stage3.head, "--weights", stage3.weights,
                     "--out", out, "--epochs", 3, "--patience", 1, "--base-lr", 50, "--batch-size", 8,
                     "--trainable-blocks", 1, "--recipe", "reference")
    assert result.exit_code == 0, result.output
    assert "validation before fine-tuning: accuracy" in result.stdout
    assert "validation after fine-tuning:  accuracy" in result.stdout
    assert "trainable layers (1): Conv_1" in result.stdout
    assert "no epoch beat the head" in result.stdout
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["metrics"]["best_epoch"] == 0 and meta["metrics"]["epochs_run"] == 1  # patience 1
    assert meta["metrics"]["val_log_loss"] == meta["metrics"]["before"]["val_log_loss"]
    assert pd.read_csv(out.with_suffix(".history.csv"))["val_loss"].iloc[0] > meta["metrics"]["val_log_loss"]

    model, _ = load_model(out, compile=False)
    head, _ = load_model(stage3.head, compile=False)
    cache = open_cache(stage3.cache)
    val = split_paths(cache, load_dataset(stage3.data))["val"]
    probs, _ = predict_images(model, val["paths"], get_backbone("mobilenet_v2"), 48)
    cached = head.predict(cache.features("labelled", passes=[0])[0][val["rows"]], verbose=0)
    assert np.max(np.abs(probs - cached)) <= 1e-4


def test_bad_input_gives_one_line_errors(stage3, tmp_path):
    base = ["finetune", "--data", stage3.data, "--weights", stage3.weights, "--epochs", 1]
    bad = tmp_path / "bad"

    lonely = tmp_path / "lonely" / "head.keras"
    lonely.parent.mkdir()
    shutil.copy(stage3.head, lonely)
    assert_clean_error(run_cli(*base, "--head", lonely, "--out", tmp_path / "a.keras"), "metadata head.json is missing")

    small = copy_head(stage3, bad / "small", image_size=16)
    assert_clean_error(run_cli(*base, "--head", small, "--out", tmp_path / "b.keras"), "too small for mobilenet_v2")

    other = copy_head(stage3, bad / "other", backbone="xception", preprocessing=get_backbone("xception").preprocessing,
                      feature_dim=2048, image_size=71)
    assert_clean_error(run_cli(*base, "--head", other, "--out", tmp_path / "c.keras"), "inputs of shape")

    (tmp_path / "a-file").write_text("x")
    assert_clean_error(run_cli(*base, "--head", stage3.head, "--out", tmp_path / "a-file" / "ft.keras"),
                       "a part of this path is a file")
    assert_clean_error(run_cli(*base, "--head", stage3.head, "--out", tmp_path / "d.keras", "--trainable-blocks", 99),
                       "choose 0 to 18")
    existing = tmp_path / "e.keras"
    existing.write_text("x")
    assert_clean_error(run_cli(*base, "--head", stage3.head, "--out", existing), "exists: pass --force")
    assert_clean_error(run_cli(*base, "--head", stage3.head, "--out", tmp_path / "f.keras", "--schedule", "cyclic"),
                       r"^error: --schedule 'cyclic': choose one of exp_range, triangular, triangular2, constant, cosine, one_cycle$")
    assert_clean_error(run_cli(*base, "--head", stage3.head, "--out", tmp_path / "g.keras", "--base-lr", -1),
                       r"^error: --base-lr -1.0 must be a positive number$")
    assert_clean_error(run_cli(*base, "--head", stage3.head, "--out", tmp_path / "h.keras", "--patience", -1),
                       r"--patience -1 must be at least 0")


@pytest.fixture(scope="module")
def from_config_file(stage3, tmp_path_factory):
    """A CLI run whose settings come from a --config file, two of them overridden on the command line,
    --recipe reference filling in the others.

    Rates that wreck the model, so no epoch beats the head: with --patience 0 (from the file) it
    still runs every epoch. The cycle's steps are single iterations (3 per epoch)."""
    folder = tmp_path_factory.mktemp("config")
    config = folder / "finetune.toml"
    config.write_text("[finetune]\nbase_lr = 50\nmax_lr = 60\nstep_size = 1\npatience = 0\nepochs = 5\n"
                      "schedule = 'exp_range'\ntrainable-blocks = 1\nbatch_size = 8\n")
    out = folder / "ft.keras"
    result = run_cli("finetune", "--data", stage3.data, "--head", stage3.head, "--out", out, "--config", config,
                     "--epochs", 2, "--schedule", "triangular", "--recipe", "reference")
    assert result.exit_code == 0, result.output
    return json.loads(out.with_suffix(".json").read_text()), pd.read_csv(out.with_suffix(".history.csv"))


def test_config_file_values_are_used_and_the_command_line_wins_and_the_recipe_fills_in(from_config_file):
    meta, history = from_config_file
    settings = meta["settings"]
    assert (settings["base_lr"], settings["max_lr"], settings["step_size"], settings["patience"]) == (50.0, 60.0, 1, 0)
    assert settings["trainable_blocks"] == 1 and meta["trainable_layers"] == ["Conv_1"]
    assert settings["epochs"] == 2 and settings["schedule"] == "triangular"  # given on the command line
    assert settings["optimizer"] == "sgd" and settings["augment"] == "recipe"  # --recipe reference, below the file


def test_schedule_triangular_cycles_between_base_and_max_lr(from_config_file):
    from dogtl.core.schedules import cyclic_lr

    _, history = from_config_file
    assert history["lr"].tolist() == pytest.approx([cyclic_lr(3, 50, 60, 1), cyclic_lr(6, 50, 60, 1)])


def test_patience_0_never_stops_early(from_config_file):
    meta, history = from_config_file
    assert meta["metrics"]["best_epoch"] == 0 and meta["metrics"]["epochs_run"] == 2  # patience 1 would stop at 1
    assert (history["val_loss"] > meta["metrics"]["before"]["val_log_loss"]).all()


def test_config_file_unknown_or_mistyped_settings_are_refused(stage3, tmp_path):
    base = ["finetune", "--data", stage3.data, "--head", stage3.head, "--out", tmp_path / "ft.keras"]
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"finetune": {"lr": 1e-3, "cyclic_mode": "triangular"}}))
    assert_clean_error(run_cli(*base, "--config", unknown),
                       r"^error: --config .*unknown.json: unknown setting\(s\) cyclic_mode, lr; known: .*base_lr")
    mistyped = tmp_path / "mistyped.toml"
    mistyped.write_text("epochs = 'three'\n")
    assert_clean_error(run_cli(*base, "--config", mistyped), r"^error: --epochs 'three': expected an integer$")
    assert_clean_error(run_cli(*base, "--config", tmp_path / "none.toml"), r"--config .*none.toml: no such file")
    assert not (tmp_path / "ft.keras").exists()


@pytest.mark.parametrize("ema_epochs", [0.0, 0.5])
def test_a_deterministic_run_killed_and_resumed_trains_as_the_uninterrupted_one(stage3, tmp_path, ema_epochs):
    """Found by benchmarks/faults.py: a resumed epoch drew other dropout masks than the
    uninterrupted run (a .keras file does not hold the seed generators' states). With
    --ema-epochs, the checkpoint holds the moving average in the model and the raw weights in
    the optimizer: the resumed run must swap them back before training on."""
    from dogtl.finetuning.train import finetune

    settings = dict(epochs=2, patience=5, deterministic=True, ema_epochs=ema_epochs)
    whole = finetune(_config(stage3, tmp_path / "whole.keras", **settings))

    seen = []

    def killer(event):
        if event.unit != "images":
            return
        seen.append(event.done)
        if len(seen) == 4:  # step 1 of epoch 2
            raise KeyboardInterrupt

    out = tmp_path / "resumed.keras"
    with pytest.raises(KeyboardInterrupt):
        finetune(_config(stage3, out, **settings), progress=killer)
    resumed = finetune(_config(stage3, out, **settings))
    assert resumed.resumed_from == 1
    assert resumed.history.to_dict("list") == whole.history.to_dict("list")  # bit-identical epochs
