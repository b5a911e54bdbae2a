"""`import dogtl`: the stages as functions with the command line's defaults, returning results."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

import dogtl


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    from dogtl.features.synthetic import write_feature_cache

    return write_feature_cache(tmp_path_factory.mktemp("api") / "features.h5", num_images=120, num_classes=3,
                               dim=16, passes=2, val_fraction=0.25, dtype="float16", seed=3)


def test_train_head_from_python_returns_metrics_and_paths_and_reports_progress(tiny_cache, tmp_path):
    rows = []
    result = dogtl.train_head(tiny_cache, tmp_path / "head.keras", epochs=3, hidden=(8,), patience=0,
                              progress=rows.append)
    assert result.model_path.exists() and result.history_path.exists()
    assert 0 <= result.metrics["val_accuracy"] <= 1 and result.metrics["val_log_loss"] > 0
    assert [e.record.epoch for e in rows] == [1, 2, 3]  # ProgressEvents with each finished epoch's record
    with pytest.raises(dogtl.DogtlError, match="exists.*--force"):
        dogtl.train_head(tiny_cache, tmp_path / "head.keras", epochs=1, progress=False)
    with pytest.raises(dogtl.DogtlError, match="--dropout 2"):
        dogtl.train_head(tiny_cache, tmp_path / "other.keras", dropout=2, progress=False)


def test_sweep_and_lr_find_from_python(tiny_cache, tmp_path):
    found = dogtl.lr_find(tiny_cache, tmp_path / "lr.png", steps=40, hidden=(8,))
    assert found.plot_path.exists() and found.base_lr < found.max_lr
    swept = dogtl.sweep(tiny_cache, params=["max_lr=1e-3,3e-3"], epochs=2, out=tmp_path / "s", progress=False)
    assert len(swept.results) == 2 and swept.best_path.exists()


def test_stage_functions_are_not_shadowed_by_the_stage_packages():
    """Importing dogtl.X binds X in the package: no module or package may be named as a function."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(dogtl.__path__):
        if module.name != "__main__":
            importlib.import_module(f"dogtl.{module.name}")
    for name in dogtl.__all__[:-2]:
        assert callable(getattr(dogtl, name)) and getattr(dogtl, name).__module__ == "dogtl.api", name


# Every command with an API function: (function, the config class its **settings fill or None,
# {CLI option: why the API has no such parameter}, {CLI option: the API's name for it}).
def _commands():
    from dogtl import api
    from dogtl.evaluation.settings import EvaluateConfig, PredictConfig
    from dogtl.features.settings import ExtractConfig
    from dogtl.finetuning.settings import FinetuneConfig
    from dogtl.fit_settings import FitConfig
    from dogtl.head.settings import HeadConfig, LRFindConfig
    from dogtl.sweeps.settings import SweepConfig

    config_file = {"config": "--config FILE: the API takes the settings themselves"}
    model_option = {"model_opt": "--model: the MODEL argument spelled as an option"}
    return {
        "extract-features": (api.extract_features, ExtractConfig, {}, {}),
        "merge-cache": (api.merge_cache, None, {"shards": "the SHARD... argument: required"}, {}),
        "train-head": (api.train_head, HeadConfig, {**config_file, **{
            name: "--auto's search (head.auto.auto_train), not train_head's"
            for name in ("auto", "budget", "trials", "storage")}}, {}),
        "lr-find": (api.lr_find, LRFindConfig, config_file, {}),
        "sweep": (api.sweep, SweepConfig, {}, {"param": "params"}),
        "finetune": (api.finetune, FinetuneConfig, {**config_file, "head_file": "the HEAD argument: --head"}, {}),
        "evaluate": (api.evaluate, EvaluateConfig, model_option, {}),
        "predict": (api.predict, PredictConfig, {**model_option, "files": "the MODEL|IMAGE... arguments: images"},
                    {}),
        "fit": (api.fit, FitConfig, {}, {}),
    }


def _api_default(function, config, name):
    """What the API uses for `name` when not given: its own parameter's default, else the config's."""
    parameter = inspect.signature(function).parameters.get(name)
    if parameter is not None and parameter.default is not inspect.Parameter.empty:
        return parameter.default
    fields = {f.name: f for f in dataclasses.fields(config)} if config is not None else {}
    if name not in fields:
        return _MISSING
    f = fields[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _same(config, name, cli_default, api_default) -> bool:
    setting = {s.name: s for s in getattr(config, "SETTINGS", ())}.get(name)
    if isinstance(cli_default, (list, tuple)) and len(cli_default) == 1:  # repeatable --cache: one default path
        cli_default = cli_default[0]
    if setting is not None and cli_default is not None:  # as the config reads it: "1024" -> (1024,), Path -> str
        cli_default = setting.convert(cli_default)
    if cli_default in (None, ()) or api_default in (None, ()):
        return cli_default in (None, ()) and api_default in (None, ())
    return str(cli_default) == str(api_default)


_MISSING = object()


def _differences(command, function, config, cli_only, renamed):
    """(option, CLI default, API default) for each option of `command` whose API default differs
    (_MISSING: the API has no such parameter); and how many options were compared."""
    import typer

    from dogtl.cli import app

    params = [p for p in typer.main.get_command(app).commands[command].params if p.name not in cli_only]
    differences = []
    for p in params:
        name = renamed.get(p.name, p.name)
        api_default = _api_default(function, config, name)
        if api_default is _MISSING or not _same(config, name, p.default, api_default):
            differences.append((p.name, p.default, api_default))
    return differences, len(params)


def test_python_defaults_are_the_command_lines():
    """Every option of every command with an API function, compared with the default the API
    uses when the option is left out (its own parameter's, else its config class's)."""
    compared = 0
    for command, (function, config, cli_only, renamed) in _commands().items():
        differences, count = _differences(command, function, config, cli_only, renamed)
        assert differences == [], command
        compared += count
    assert compared >= 140  # 148 options of 9 commands (extract-features alone has 25); 27 before issue 25


def test_a_different_python_default_is_caught():
    """The comparison above can fail: an API whose batch size defaults to 33, or that lacks an option."""
    from dogtl.features.settings import ExtractConfig

    other = dataclasses.make_dataclass("Other", [(f.name, f.type, dataclasses.field(default=f.default))
                                                 for f in dataclasses.fields(ExtractConfig) if f.name != "cut_dtype"])
    other = dataclasses.make_dataclass("Other", [("batch_size", int, dataclasses.field(default=33))], bases=(other,))
    differences, _ = _differences("extract-features", dogtl.extract_features, other, {}, {})
    assert [(name, api) for name, _, api in differences] == [("batch_size", 33), ("cut_dtype", _MISSING)]
