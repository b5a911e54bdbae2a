"""train-head: learning on cached features, pass sampling, early stopping, outputs, config, errors."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest

from conftest import assert_clean_error, run_cli
from dogtl.core.errors import CacheError, DogtlError
from dogtl.core.epochs import HISTORY_COLUMNS
from dogtl.head.train import fit_head, load_training_data, train_head
from dogtl.head.settings import HeadConfig, load_config_file, resolve_batch_size
from dogtl.features.synthetic import write_feature_cache

FAST = dict(batch_size=16, hidden=(32,), base_lr=1e-3, max_lr=1e-2)


@pytest.fixture(scope="module")
def separable(tmp_path_factory):
    """4 well-separated classes, 240 images (180 train / 60 val), 32-d features, 2 augmented passes."""
    return write_feature_cache(tmp_path_factory.mktemp("sep") / "features.h5", num_images=240, num_classes=4,
                               dim=32, passes=2, val_fraction=0.25, seed=1)


@pytest.fixture(scope="module")
def arrays(separable):
    from dogtl.features.cache import open_cache

    return load_training_data(open_cache(separable))


@pytest.fixture(scope="module")
def trained(separable, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "head.keras"
    config = HeadConfig(epochs=25, patience=5, seed=3, **FAST)
    return config, train_head(config, cache=separable, out=out)


def test_learns_better_than_chance(trained):
    _, result = trained
    assert result.metrics["val_accuracy"] >= 0.8  # chance: 0.25
    assert result.metrics["val_log_loss"] < 0.5 * math.log(4)
    assert result.train_images == 180 and result.val_images == 60 and result.passes == 3
    assert result.resolved.batch_size == 16


def test_outputs_and_metadata(trained, separable):
    from dogtl.features.cache import open_cache

    config, result = trained
    folder = result.model_path.parent
    assert sorted(p.name for p in folder.iterdir()) == ["head.history.csv", "head.json", "head.keras", "head.png"]
    meta = json.loads((folder / "head.json").read_text())
    cache = open_cache(separable)
    assert meta["kind"] == "head" and meta["classes"] == list(cache.classes)
    assert meta["cache_fingerprint"] == cache.fingerprint and meta["cache"] == str(separable)
    for key in ("backbone", "weights", "image_size", "preprocessing"):
        assert meta[key] == cache.fingerprint[key]
    assert meta["feature_dim"] == 32
    assert meta["settings"] == json.loads(json.dumps(asdict(config)))
    assert set(meta["metrics"]) >= {"val_accuracy", "val_log_loss", "epochs_run", "best_epoch"}
    assert meta["metrics"] == pytest.approx(result.metrics)
    history = pd.read_csv(result.history_path)
    assert list(history.columns) == HISTORY_COLUMNS
    assert list(history.epoch) == list(range(1, result.metrics["epochs_run"] + 1))
    assert history.lr.between(config.base_lr * 0.999, config.max_lr * 1.001).all() and history.lr.nunique() > 3
    assert result.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_best_weights_are_restored_and_saved(trained, arrays):
    from dogtl.core.artifacts import load_model
    from dogtl.core.metrics import scores

    _, result = trained
    history = pd.read_csv(result.history_path)
    best = int(history.val_loss.idxmin())
    assert result.metrics["best_epoch"] == best + 1
    assert result.metrics["val_log_loss"] == pytest.approx(history.val_loss[best], rel=1e-6)
    model, _ = load_model(result.model_path)
    accuracy, loss = scores(arrays.val_labels, model.predict(arrays.val_features, verbose=0), 4).values()
    assert loss == pytest.approx(result.metrics["val_log_loss"], rel=1e-5)
    assert accuracy == pytest.approx(result.metrics["val_accuracy"])
    assert [layer.__class__.__name__ for layer in model.layers] == [
        "InputLayer", "BatchNormalization", "Dropout", "Dense", "Dropout", "Dense"]


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_precision_trains_alike_and_saves_a_float32_model(separable, arrays, tmp_path, precision):
    """bfloat16 matmuls learn what float32 ones do; either way the saved head computes in float32
    and its validation scores are the ones reported."""
    from dogtl.core.artifacts import load_model
    from dogtl.core.metrics import scores

    out = tmp_path / "head.keras"
    result = train_head(HeadConfig(epochs=6, patience=0, seed=3, precision=precision, **FAST),
                        cache=separable, out=out)
    assert result.resolved.precision == precision
    assert json.loads(out.with_suffix(".json").read_text())["resolved"]["precision"] == precision
    model, _ = load_model(out)
    assert all(layer.compute_dtype == "float32" for layer in model.layers)
    accuracy, loss = scores(arrays.val_labels, model.predict(arrays.val_features, verbose=0), 4).values()
    assert loss == pytest.approx(result.metrics["val_log_loss"], rel=1e-5)
    history = pd.read_csv(result.history_path)
    assert history.val_loss.min() == pytest.approx(result.metrics["val_log_loss"], rel=1e-6)
    reference = fit_head(HeadConfig(epochs=6, patience=0, seed=3, precision="float32", **FAST),
                         arrays.train_features, arrays.train_labels, arrays.val_features, arrays.val_labels, 4)
    assert result.metrics["val_log_loss"] == pytest.approx(reference.metrics["val_log_loss"], rel=0.05)
    same = np.allclose(history.loss, reference.history.loss, rtol=1e-6)
    assert same == (precision == "float32")  # bfloat16 really multiplied in bfloat16


def test_auto_precision_is_bfloat16_only_where_the_cpu_has_it(monkeypatch):
    from dogtl.core import precision

    assert precision.resolve("float32", head_batch=128) == "float32"
    assert precision.resolve("bfloat16", head_batch=16) == "bfloat16"
    for native, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(precision, "native_bfloat16", lambda native=native: native)
        assert precision.resolve("auto", head_batch=64) == expected
        assert HeadConfig().resolve(9200).precision == expected
        assert HeadConfig().resolve(1000).precision == "float32"  # batch 16: float32 is faster


def test_label_smoothing_raises_the_training_loss_only(arrays):
    """Smoothed targets cannot be met exactly, so the training loss stays higher; validation
    log loss is always the plain one."""
    runs = {e: fit_head(HeadConfig(epochs=4, patience=0, seed=3, label_smoothing=e, **FAST), arrays.train_features,
                        arrays.train_labels, arrays.val_features, arrays.val_labels, 4) for e in (0.0, 0.3)}
    plain, smoothed = runs[0.0].history, runs[0.3].history
    targets = np.array([1 - 0.3 + 0.3 / 4] + [0.3 / 4] * 3)
    assert (smoothed.loss >= -(targets * np.log(targets)).sum() - 1e-4).all()  # their entropy: the least loss
    assert smoothed.loss.iloc[-1] > plain.loss.iloc[-1] + 0.3
    assert smoothed.val_accuracy.iloc[-1] >= 0.8


def test_weight_decay_shrinks_the_kernels_only(arrays):
    def norms(decay):
        fit = fit_head(HeadConfig(epochs=3, patience=0, seed=3, weight_decay=decay, dropout=0.0, input_dropout=0.0,
                                  **FAST),
                       arrays.train_features, arrays.train_labels, arrays.val_features, arrays.val_labels, 4)
        return {w.path: float(np.linalg.norm(w.numpy())) for w in fit.model.trainable_weights}

    plain, decayed = norms(0.0), norms(30.0)
    kernels = [k for k in plain if k.endswith("kernel")]
    assert len(kernels) == 2 and all(decayed[k] < 0.9 * plain[k] for k in kernels)
    assert any(k.endswith("bias") for k in plain)


def test_early_stopping_on_val_log_loss():
    """Random labels: nothing to learn, validation loss stops improving, training stops `patience` later."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 64, 8)).astype("float32")
    fit = fit_head(HeadConfig(epochs=40, patience=2, hidden=(8,), batch_size=16, base_lr=1e-3, max_lr=1e-2),
                   x, rng.integers(0, 3, 64), rng.standard_normal((30, 8)).astype("float32"),
                   rng.integers(0, 3, 30), 3)
    m = fit.metrics
    assert m["epochs_run"] < 40 and m["epochs_run"] == m["best_epoch"] + 2
    assert m["val_log_loss"] == pytest.approx(fit.history.val_loss.min())


def test_same_seed_same_metrics(arrays):
    def run(seed):
        return fit_head(HeadConfig(epochs=3, seed=seed, **FAST), arrays.train_features, arrays.train_labels,
                        arrays.val_features, arrays.val_labels, 4)

    a, b, c = run(5), run(5), run(6)
    assert a.metrics == b.metrics
    pd.testing.assert_frame_equal(a.history, b.history)
    assert not a.history.loss.equals(c.history.loss)


def test_speed_ups_do_not_change_the_maths():
    """The XLA optimizer update and the fast MatMul gradient give what plain Keras and TF's own
    MatMul gradient give (same seed, so same dropout masks and batches)."""
    import keras

    from dogtl.head.train import build_compiled_head
    from dogtl.head.trainloop import EpochRunner

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((2, 40, 12)).astype("float32"), rng.integers(0, 3, 40)
    config = HeadConfig(batch_size=8, hidden=(6,), base_lr=1e-3, max_lr=1e-2, step_size=3)
    weights = []
    for switches in ({}, {"jit_optimizer": False}, {"fast_matmul_grad": False}):
        keras.utils.set_random_seed(1)
        model, _ = build_compiled_head(config, 12, 3, config.resolve(40))
        runner = EpochRunner(model, x, y, 8, seed=1, **switches)
        runner.run(1)
        runner.run(2)
        weights.append(model.get_weights())
    for other in weights[1:]:
        for a, b in zip(weights[0], other):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_epoch_plan_draws_every_pass_and_every_row():
    from dogtl.head.trainloop import epoch_plan, steps_per_epoch

    n, passes, batch = 50, 4, 16
    assert steps_per_epoch(n, batch) == 4
    seen = np.zeros((passes, n), int)
    orders = []
    for epoch in range(1, 41):
        rows, chosen = (t.numpy() for t in epoch_plan(7, epoch, n, passes, batch))
        assert len(rows) == 64 and set(rows) == set(range(n))  # every row, topped up to whole batches
        assert chosen.min() >= 0 and chosen.max() < passes
        seen[chosen[:n], rows[:n]] += 1
        orders.append(rows)
    share = seen.sum(axis=1) / seen.sum()
    assert (share > 0.15).all()  # clean and every augmented pass are drawn (uniform: 0.25 each)
    assert (seen > 0).sum(axis=0).mean() > 3  # a row gets different passes in different epochs
    assert not all(np.array_equal(orders[0], o) for o in orders[1:])  # reshuffled every epoch
    again = [t.numpy() for t in epoch_plan(7, 1, n, passes, batch)]
    assert np.array_equal(again[0], orders[0])  # a pure function of (seed, epoch)


@pytest.fixture(scope="module")
def story_cache(tmp_path_factory):
    """Passes that tell different stories: training images' CLEAN pass and validation images'
    AUGMENTED passes carry the features of the next class; everything else is truthful."""
    def rewrite(p, x, labels, is_val):
        means = np.stack([x[labels == c].mean(axis=0) for c in range(3)])
        lie = means[(labels + 1) % 3] + 0.3 * (x - means[labels])
        wrong = ~is_val if p == 0 else is_val
        return np.where(wrong[:, None], lie, x)

    return write_feature_cache(tmp_path_factory.mktemp("story") / "features.h5", num_images=180, num_classes=3,
                               dim=16, passes=3, val_fraction=0.3, seed=2, pass_transform=rewrite)


def test_training_uses_augmented_passes_and_validation_never_does(story_cache, tmp_path):
    # Trained on all passes, the truthful augmented ones (3 of 4) win: validation on the clean
    # pass is right. Had validation used its augmented passes, it would be wrong.
    both = train_head(HeadConfig(epochs=15, **FAST), cache=story_cache, out=tmp_path / "all.keras")
    assert both.metrics["val_accuracy"] >= 0.8 and both.passes == 4
    # Trained on the clean pass only, the head learns the lie (early stopping then keeps the first
    # epoch, which has learnt it least: how much depends on the initial weights, so look at the last).
    clean = train_head(HeadConfig(epochs=15, clean_only=True, **FAST), cache=story_cache,
                       out=tmp_path / "clean.keras")
    assert clean.history.val_accuracy.iloc[-1] <= 0.2 and clean.passes == 1


def test_refuses_to_overwrite_without_force(separable, tmp_path):
    out = tmp_path / "head.keras"
    config = HeadConfig(epochs=1, **FAST)
    train_head(config, cache=separable, out=out)
    with pytest.raises(DogtlError, match="exists.*--force"):
        train_head(config, cache=separable, out=out)
    before = out.stat().st_mtime_ns
    again = train_head(HeadConfig(epochs=2, **FAST), cache=separable, out=out, force=True)
    assert out.stat().st_mtime_ns >= before and again.metrics["epochs_run"] <= 2
    assert json.loads(out.with_suffix(".json").read_text())["settings"]["epochs"] == 2
    assert not list(tmp_path.glob("*.tmp*"))


# -- errors ------------------------------------------------------------------------------

def test_missing_incomplete_and_foreign_caches(tmp_path):
    import h5py

    from dogtl.features.partial import PartialCache

    out = str(tmp_path / "m" / "head.keras")
    with pytest.raises(CacheError, match="no feature cache"):
        train_head(HeadConfig(), cache=tmp_path / "nope.h5", out=out)
    partial = tmp_path / "partial.h5"
    PartialCache(partial).start({"backbone": "x"})
    with pytest.raises(CacheError, match="incomplete"):
        train_head(HeadConfig(), cache=partial, out=out)
    text = tmp_path / "text.h5"
    text.write_text("hello")
    with pytest.raises(CacheError, match="not a dogtl feature cache"):
        train_head(HeadConfig(), cache=text, out=out)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(CacheError, match="not a dogtl feature cache"):
        train_head(HeadConfig(), cache=other, out=out)
    unfinished = tmp_path / "unfinished.h5"
    with h5py.File(unfinished, "w") as f:
        f.attrs["format"], f.attrs["complete"] = "dogtl-features", False
    with pytest.raises(CacheError, match="incomplete"):
        train_head(HeadConfig(), cache=unfinished, out=out)
    no_val = write_feature_cache(tmp_path / "noval.h5", num_images=30, val_fraction=0.0)
    with pytest.raises(CacheError, match="no validation images"):
        train_head(HeadConfig(), cache=no_val, out=out)


@pytest.mark.parametrize("changes, needle", [
    ({"base_lr": -1e-4}, "--base-lr -0.0001"),
    ({"max_lr": 0.0}, "--max-lr 0.0"),
    ({"base_lr": 1e-2, "max_lr": 1e-3}, "--base-lr 0.01 is above --max-lr 0.001"),
    ({"epochs": 0}, "--epochs 0"),
    ({"batch_size": 0}, "--batch-size 0"),
    ({"schedule": "cosine"}, "--schedule 'cosine'"),
    ({"optimizer": "adagrad"}, "--optimizer 'adagrad'"),
    ({"patience": -1}, "--patience -1"),
    ({"step_size": 0}, "--step-size 0"),
    ({"gamma": 1.5}, "--gamma 1.5"),
    ({"dropout": 1.0}, "--dropout 1.0"),
    ({"hidden": "512,x"}, "--hidden"),
    ({"label_smoothing": 1.0}, "--label-smoothing 1.0"),
    ({"weight_decay": -0.1}, "--weight-decay -0.1"),
    ({"precision": "float16"}, "--precision 'float16'"),
    ({"epochs": "ten"}, "--epochs 'ten': expected an integer"),
])
def test_bad_settings(changes, needle):
    with pytest.raises(DogtlError, match=needle.replace("(", r"\(")):
        HeadConfig(**changes)


def test_automatic_batch_size():
    # The recipe's 16 unless an epoch keeps >= 64 steps at 32, 64 or 128 (Kaggle: 9,200 training images).
    assert ([resolve_batch_size(None, n) for n in (48, 2047, 2048, 4096, 8191, 8192, 9200, 10 ** 6)]
            == [16, 16, 32, 64, 64, 128, 128, 128])
    assert resolve_batch_size(8, 10 ** 6) == 8


def test_default_learning_rates_scale_with_the_batch():
    """The recipe's rates at 16; at an automatic 64, sqrt(4) = 2x, and the same exp_range decay per epoch."""
    small, big = HeadConfig().resolve(48), HeadConfig().resolve(5000)
    assert (small.batch_size, small.base_lr, small.max_lr) == (16, pytest.approx(1e-4), pytest.approx(1e-3))
    assert small.steps_per_epoch == 3 and small.step_size == 12 and small.gamma == pytest.approx(0.99994)
    assert (big.batch_size, big.base_lr, big.max_lr) == (64, pytest.approx(2e-4), pytest.approx(2e-3))
    assert big.steps_per_epoch == 79 and big.step_size == 4 * 79
    assert big.gamma ** 79 == pytest.approx(0.99994 ** (79 * 4))
    given = HeadConfig(base_lr=3e-4, max_lr=5e-4, batch_size=64, step_size=7, gamma=0.5).resolve(8257)
    assert (given.base_lr, given.max_lr, given.step_size, given.gamma) == (3e-4, 5e-4, 7, 0.5)
    with pytest.raises(DogtlError, match=r"--base-lr 0.005 is above --max-lr 0.002 \(the default at batch 64\)"):
        HeadConfig(base_lr=5e-3).resolve(5000)


def test_constant_schedule_ignores_max_and_hidden_parsing():
    assert HeadConfig(schedule="constant", base_lr=1e-2, max_lr=1e-3).base_lr == 1e-2
    assert HeadConfig(hidden="512, 256").hidden == (512, 256)
    assert HeadConfig(hidden="none").hidden == () and HeadConfig(hidden=[64]).hidden == (64,)
    assert HeadConfig(base_lr=1, max_lr=2).base_lr == 1.0  # ints from a config file become floats
    grid = HeadConfig(epochs=np.int64(3), batch_size=np.int32(8), dropout=np.float32(0.25))  # a numpy sweep grid
    assert (grid.epochs, grid.batch_size, grid.dropout) == (3, 8, 0.25) and type(grid.epochs) is int
    assert json.dumps(asdict(grid))


@pytest.mark.parametrize("args, needle", [
    (["--epochs", "0"], "--epochs 0"),
    (["--base-lr", "-1e-4"], "--base-lr"),
    (["--base-lr", "0.01", "--max-lr", "0.001"], "above --max-lr"),
    (["--cache", "no/such.h5"], "no feature cache"),
])
def test_cli_errors_are_one_line(args, needle, tmp_path):
    assert_clean_error(run_cli("train-head", "--out", tmp_path / "head.keras", *args), needle)


# -- config files --------------------------------------------------------------------------

def test_config_files(tmp_path):
    toml = tmp_path / "head.toml"
    toml.write_text('epochs = 7\nmax-lr = 0.002\nhidden = [256, 128]\nclean_only = true\n')
    assert load_config_file(toml) == {"epochs": 7, "max_lr": 0.002, "hidden": [256, 128], "clean_only": True}
    section = tmp_path / "section.toml"
    section.write_text("[train_head]\nbatch_size = 32\n")
    assert load_config_file(section) == {"batch_size": 32}
    js = tmp_path / "head.json"
    js.write_text(json.dumps({"optimizer": "adam", "step_size": 100}))
    assert HeadConfig(**load_config_file(js)).step_size == 100
    bad_key = tmp_path / "bad.toml"
    bad_key.write_text("epoch = 3\n")
    with pytest.raises(DogtlError, match="unknown setting.*epoch"):
        load_config_file(bad_key)
    broken = tmp_path / "broken.toml"
    broken.write_text("epochs = \n")
    with pytest.raises(DogtlError, match="not valid TOML"):
        load_config_file(broken)
    with pytest.raises(DogtlError, match="no such file"):
        load_config_file(tmp_path / "missing.toml")


def test_cli_options_override_config_file(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text(f'epochs = 0\ncache = "{tmp_path / "missing.h5"}"\n')
    # The file's epochs = 0 is used ...
    assert_clean_error(run_cli("train-head", "--config", conf, "--out", tmp_path / "h.keras"), "--epochs 0")
    # ... unless the command line gives --epochs: then the next problem is the file's cache.
    assert_clean_error(run_cli("train-head", "--config", conf, "--epochs", 2, "--out", tmp_path / "h.keras"),
                       "missing.h5.*no feature cache")


def test_cli_trains_with_config_file(separable, tmp_path):
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"hidden": "8", "dropout": 0.1, "epochs": 9, "batch_size": 16,
                                "base_lr": 0.001, "max_lr": 0.01, "cache": str(separable)}))
    out = tmp_path / "models" / "head.keras"
    result = run_cli("train-head", "--config", conf, "--epochs", 3, "--out", out)
    assert result.exit_code == 0, result.output
    assert "validation accuracy" in result.stdout and "log loss" in result.stdout
    assert result.stdout.count("epoch ") >= 1
    settings = json.loads(out.with_suffix(".json").read_text())["settings"]
    assert settings["epochs"] == 3 and settings["hidden"] == [8] and settings["dropout"] == 0.1


def test_cli_on_an_extracted_cache(small_cache, tmp_path):
    """End to end on features from a real (random-weights) backbone, float16 as extracted."""
    out = tmp_path / "head.keras"
    result = run_cli("train-head", "--cache", small_cache, "--out", out, "--epochs", 2, "--hidden", 16)
    assert result.exit_code == 0, result.output
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["backbone"] == "resnet50" and meta["image_size"] == 32 and meta["passes_used"] == 3
    assert math.isfinite(meta["metrics"]["val_log_loss"])


def test_cli_defaults_match_the_library_and_help_teaches():
    import inspect

    import typer

    from dogtl.cli import app
    from dogtl.head.lrfind import LRFindConfig, lr_find

    group = typer.main.get_command(app)
    for name, config, stage in (("train-head", HeadConfig(), train_head), ("lr-find", LRFindConfig(), lr_find)):
        command = group.commands[name]
        io = inspect.signature(stage).parameters  # cache, out, force: the stage function's own defaults
        for param in command.params:
            if param.name in ("config", "ctx", "auto", "budget", "trials", "storage", "track"):  # --auto: sweeps/auto.py's own options; --track: MLflow
                continue
            got = param.default
            if param.name == "cache":  # repeatable: a list of one default path
                got = got[0] if isinstance(got, (list, tuple)) and len(got) == 1 else got
            if param.name in ("cache", "out", "force"):
                assert str(got) == str(io[param.name].default), param.name
                continue
            if param.name == "hidden":
                got = tuple(int(s) for s in str(got).split(","))
            assert got == getattr(config, param.name), param.name
    text = run_cli("train-head", "--help").stdout
    for option in ("--cache", "--out", "--epochs", "--batch-size", "--schedule", "--base-lr", "--max-lr",
                   "--step-size", "--optimizer", "--patience", "--config", "--force", "--clean-only", "--hidden"):
        assert option in text, option
    assert "--start-lr" in run_cli("lr-find", "--help").stdout


def test_head_weights_depend_on_the_seed_alone_while_other_threads_draw_random_numbers():
    """Sweep workers may build heads in threads (joblib threading, Dask): another thread drawing
    from Python's global `random` must not change a head's initial weights or dropout seeds."""
    import random
    import threading

    from dogtl.head.train import build_compiled_head

    resolved = HeadConfig(**FAST).resolve(160)

    def weights(seed=7):
        model, _ = build_compiled_head(HeadConfig(seed=seed, **FAST), 32, 4, resolved)
        seeds = [np.asarray(layer.seed_generator.state) for layer in model.layers if hasattr(layer, "seed_generator")]
        return model.get_weights() + seeds

    alone = weights()
    assert len({tuple(s) for s in alone[-2:]}) == 2  # each dropout layer has its own stream
    assert not any(np.array_equal(a, b) and a.std() > 0 for a, b in zip(alone, weights(8)))  # the seed matters
    stop = threading.Event()

    def draw():
        while not stop.is_set():
            random.random()

    drawer = threading.Thread(target=draw)
    drawer.start()
    try:
        crowded = [weights() for _ in range(3)]
    finally:
        stop.set()
        drawer.join()
    assert len(alone) > 8  # kernels, biases, BatchNorm, and the dropout layers' seed states
    for other in crowded:
        assert all(np.array_equal(a, b) for a, b in zip(alone, other))


def test_a_failed_save_leaves_none_of_the_outputs_so_the_rerun_is_not_refused(separable, tmp_path, monkeypatch):
    """Found by benchmarks/faults.py: a kill between the history CSV and the model left the CSV,
    and the rerun refused to overwrite it. The four files are renamed together now."""
    from dogtl.head import train as head_train

    class Killed(Exception):
        pass

    def killed(*args, **kwargs):
        raise Killed

    out = tmp_path / "head.keras"
    config = HeadConfig(epochs=2, seed=3, **FAST)
    with monkeypatch.context() as m:
        m.setattr(head_train, "save_model", killed)
        with pytest.raises(Killed):
            train_head(config, cache=separable, out=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no history, plot, model or temporary file
    result = train_head(config, cache=separable, out=out)  # the rerun
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.history.csv", "head.json", "head.keras", "head.png"]
    assert len(pd.read_csv(result.history_path)) == 2
