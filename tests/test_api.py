"""`import dogtl`: the stages as functions with the command line's defaults, returning results."""

from __future__ import annotations

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
    import dogtl.finetuning.train  # noqa: F401  importing a sub-package sets an attribute on dogtl
    import dogtl.sweeps.run  # noqa: F401

    for name in dogtl.__all__[:-2]:
        assert callable(getattr(dogtl, name)) and getattr(dogtl, name).__module__ == "dogtl.api", name


def test_python_defaults_are_the_command_lines():
    import typer

    from dogtl.cli import app

    commands = typer.main.get_command(app).commands
    for function, command in [(dogtl.extract_features, "extract-features"), (dogtl.train_head, "train-head"),
                              (dogtl.lr_find, "lr-find"), (dogtl.finetune, "finetune"),
                              (dogtl.evaluate, "evaluate"), (dogtl.predict, "predict")]:
        defaults = {p.name: p.default for p in commands[command].params}
        for name, parameter in inspect.signature(function).parameters.items():
            if parameter.default is inspect.Parameter.empty or name in ("progress", "settings", "images") \
                    or name not in defaults:
                continue
            default = defaults[name]
            if isinstance(default, (list, tuple)) and len(default) == 1:  # repeatable --cache: one default path
                default = default[0]
            assert str(parameter.default) == str(default), (command, name)
