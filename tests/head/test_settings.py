"""One declaration per setting: the config class, the CLI, config files and sweep spaces agree,
and a setting added through the declarations (warmup_epochs) works everywhere."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_clean_error, run_cli

from dogtl.core.errors import DogtlError
from dogtl.head.settings import HEAD_SETTINGS, HeadConfig, LRFindConfig
from dogtl.sweeps.space import parameter_names, parse_param_option

FAST = dict(hidden=(16,), batch_size=16, base_lr=1e-3, max_lr=1e-2)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    from dogtl.features.synthetic import write_feature_cache

    return write_feature_cache(tmp_path_factory.mktemp("settings") / "features.h5", num_images=120, num_classes=3,
                               dim=16, passes=2, val_fraction=0.25, dtype="float16", seed=3)


def test_every_declared_setting_is_a_field_an_option_and_a_sweep_parameter():
    import typer

    from dogtl.cli import app

    names = [s.name for s in HEAD_SETTINGS]
    assert list(HeadConfig.__dataclass_fields__) == names
    options = {p.name for p in typer.main.get_command(app).commands["train-head"].params}
    assert set(names) <= options
    assert set(s.name for s in HEAD_SETTINGS if s.searchable) <= set(parameter_names())
    assert {"cache", "out", "force"}.isdisjoint(HeadConfig.__dataclass_fields__)  # I/O is not a hyperparameter


def test_lr_find_shares_train_heads_declarations():
    shared = {s.name: s for s in LRFindConfig.SETTINGS}
    for s in HEAD_SETTINGS:
        if s.name in shared:
            assert shared[s.name] is s


@pytest.mark.parametrize("value, needle", [(-1, "--warmup-epochs -1 must be at least 0"),
                                           ("two", "--warmup-epochs 'two': expected an integer")])
def test_warmup_epochs_is_checked_like_any_setting(value, needle):
    with pytest.raises(DogtlError, match=needle):
        HeadConfig(warmup_epochs=value)


def test_warmup_ramps_the_learning_rate_linearly():
    from dogtl.core.schedules import cyclic_lr, warmup_lr
    from dogtl.head.train import fit_head

    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 64, 8)).astype(np.float32)
    y = rng.integers(0, 3, 64)
    config = HeadConfig(epochs=4, patience=0, warmup_epochs=2, schedule="triangular", step_size=40, **FAST)
    fit = fit_head(config, x, y, x[0], y, 3)
    steps = fit.resolved.steps_per_epoch
    for row in fit.history.itertuples():
        it = row.epoch * steps - 1
        want = warmup_lr(it, cyclic_lr(it, 1e-3, 1e-2, 40, "triangular"), 2 * steps)
        assert row.lr == pytest.approx(want, rel=1e-5)
    assert fit.history.lr[0] == pytest.approx(cyclic_lr(steps - 1, 1e-3, 1e-2, 40, "triangular") / 2, rel=1e-5)
    plain = fit_head(HeadConfig(epochs=4, patience=0, schedule="triangular", step_size=40, **FAST), x, y, x[0], y, 3)
    assert plain.history.lr[0] > fit.history.lr[0]


def test_warmup_lr_formula():
    from dogtl.core.schedules import warmup_lr

    assert [warmup_lr(i, 1.0, 4) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_lr(0, 0.3, 0) == 0.3


def test_warmup_schedule_saves_and_loads_with_a_model():
    import keras

    from dogtl.core.schedules import CyclicLR, Warmup

    for inner in (0.01, CyclicLR(1e-4, 1e-3, 10, mode="exp_range", gamma=0.999)):
        schedule = Warmup(inner, 7)
        again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
        assert [float(again(i)) for i in range(12)] == pytest.approx([float(schedule(i)) for i in range(12)])


def test_warmup_through_the_cli_config_file_and_sweep(tmp_path, tiny_cache):
    conf = tmp_path / "c.toml"
    conf.write_text("warmup_epochs = 1\nepochs = 2\nhidden = 8\n")
    out = tmp_path / "head.keras"
    result = run_cli("train-head", "--cache", tiny_cache, "--config", conf, "--out", out)
    assert result.exit_code == 0, result.output
    assert json.loads(out.with_suffix(".json").read_text())["settings"]["warmup_epochs"] == 1
    assert_clean_error(run_cli("train-head", "--cache", tiny_cache, "--warmup-epochs", -2, "--out", out,
                               "--force"), "--warmup-epochs -2")
    assert parse_param_option("warmup_epochs=0,2").values == (0, 2)
    sweep = run_cli("sweep", "--cache", tiny_cache, "--param", "warmup_epochs=0,2", "--param", "hidden=8",
                    "--epochs", 2, "--out", tmp_path / "sweep")
    assert sweep.exit_code == 0, sweep.output
    records = [json.loads(p.read_text()) for p in (tmp_path / "sweep" / "trials").glob("*.json")]
    assert sorted(r["settings"]["warmup_epochs"] for r in records) == [0, 2]
    assert all(r["fused"] for r in records)  # the fused path trains fit_head's own Keras schedule
    fused = {r["settings"]["warmup_epochs"]: r["history"] for r in records}
    assert fused[2][0]["lr"] < fused[0][0]["lr"]  # the first epoch ramps up


def test_a_fused_warmup_trial_equals_train_head(tiny_cache):
    from dogtl.features.cache import open_cache
    from dogtl.head.train import fit_head, load_training_data
    from dogtl.sweeps.fused import train_fused

    cache = open_cache(tiny_cache)
    data = load_training_data(cache)
    config = HeadConfig(epochs=3, patience=0, warmup_epochs=2, hidden=(8,), precision="float32")
    alone = fit_head(config, data.train_features, data.train_labels, data.val_features, data.val_labels, 3)
    features = np.stack([cache.features("labelled", passes=[p])[0] for p in range(cache.num_passes)])
    rows = np.flatnonzero(~cache.is_val)
    (fused,) = train_fused([config], features, cache.labels, rows, np.flatnonzero(cache.is_val), 3)
    assert [h["lr"] for h in fused.history] == pytest.approx(list(alone.history.lr), rel=1e-6)
    assert [h["loss"] for h in fused.history] == pytest.approx(list(alone.history.loss), rel=1e-5)


def test_every_stage_config_is_declared_and_paths_flags_hints_come_from_the_declaration():
    """extract-features, evaluate, predict, sweep and the demo declare their settings as train-head does:
    a path option takes a Path and stores text, a flag has no --no- form, a range error ends with its hint."""
    from pathlib import Path

    from dogtl.core.settings import Setting, choices_help
    from dogtl.demo_settings import DemoConfig
    from dogtl.evaluation.settings import EvaluateConfig, PredictConfig
    from dogtl.features.settings import ExtractConfig
    from dogtl.fit_settings import FitConfig
    from dogtl.sweeps.settings import SweepConfig

    for config in (ExtractConfig, EvaluateConfig, PredictConfig, SweepConfig, DemoConfig, FitConfig):
        assert {s.name for s in config.SETTINGS} <= set(config.__dataclass_fields__), config
    assert ExtractConfig(data=Path("some/where")).data == "some/where"
    assert ExtractConfig(rotation=10).augmentation.as_dict() == {"rotation": 10.0, "zoom": 0.25, "shift": 0.2,
                                                                 "hflip": True}
    with pytest.raises(DogtlError, match=r"--folds 1 must be at least 2 \(leave it out"):
        SweepConfig(folds=1)
    with pytest.raises(DogtlError, match="--runtime 'tpu': choose one of auto, tensorflow"):
        PredictConfig(runtime="tpu")
    force = Setting("force", "bool", False, "Overwrite.", cli_names=("--force",))
    assert force.cli_option().param_decls == ("--force",)
    assert choices_help(("a", "b", "c"), {"b": "the second"}) == "a, b (the second) or c"
    # a duration: seconds in the config, a time like 30m on the command line and in files
    assert FitConfig(budget="1h30m").budget == 5400.0 and FitConfig(budget=90).budget == 90.0
    budget = next(s for s in FitConfig.SETTINGS if s.name == "budget")
    assert budget.cli_default() == "30m" and FitConfig(data=Path("d")).folder == Path("models/model.fit")
    with pytest.raises(DogtlError, match=r"--budget '0': must be a positive time"):
        FitConfig(budget="0")
