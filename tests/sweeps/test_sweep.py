"""dogtl sweep: search spaces, folds, fused training, results, best config, resume, parallel backends."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from conftest import assert_clean_error, run_cli

from dogtl.core.errors import DogtlError
from dogtl.head.settings import HeadConfig
from dogtl.sweeps.space import build_space, grid, load_space_file, parse_param_option, sample, trial_config

TINY = dict(num_images=120, num_classes=3, dim=16, passes=2, val_fraction=0.25, dtype="float16", seed=3)
# dropout 0 and float32 matmuls: a fused trial then equals fit_head (and train-head) to float rounding
NO_DROPOUT = ["--param", "dropout=0", "--param", "input_dropout=0", "--param", "precision=float32"]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """A 120 x 16 float16 cache, 3 classes, clean + 2 augmented passes (written with cache.write_cache)."""
    from dogtl.features.synthetic import write_feature_cache

    return write_feature_cache(tmp_path_factory.mktemp("sweep") / "features.h5", **TINY)


# -- search spaces ---------------------------------------------------------------------------

def test_grid_expands_every_combination_in_order():
    space = build_space(None, ["hidden=8,16x8,none", "max_lr=1e-3,3e-3", "optimizer=adam"])
    trials, dropped = grid(space, {})
    assert len(trials) == 6 and not dropped
    assert trials[:3] == [{"hidden": (8,), "max_lr": 1e-3, "optimizer": "adam"},
                          {"hidden": (8,), "max_lr": 3e-3, "optimizer": "adam"},
                          {"hidden": (16, 8), "max_lr": 1e-3, "optimizer": "adam"}]
    assert trials[-1] == {"hidden": (), "max_lr": 3e-3, "optimizer": "adam"}
    assert space.searched == ["hidden", "max_lr"]
    assert trial_config({"epochs": 7}, trials[2]) == HeadConfig(epochs=7, hidden=(16, 8), max_lr=1e-3,
                                                                 optimizer="adam")


def test_label_smoothing_weight_decay_and_precision_are_searchable():
    space = build_space(None, ["label_smoothing=0,0.1", "weight_decay=0,1e-2", "precision=float32,bfloat16"])
    trials, dropped = grid(space, {})
    assert len(trials) == 8 and not dropped
    configs = [trial_config({}, t) for t in trials]
    assert {(c.label_smoothing, c.weight_decay, c.precision) for c in configs} == {
        (e, w, p) for e in (0.0, 0.1) for w in (0.0, 1e-2) for p in ("float32", "bfloat16")}
    with pytest.raises(DogtlError, match="label_smoothing"):
        build_space(None, ["label_smoothing=low"])


def test_grid_drops_combinations_train_head_refuses_and_layers_parameter():
    trials, dropped = grid(build_space(None, ["base_lr=1e-4,1e-2", "max_lr=1e-3,2e-2"]), {})
    assert {(t["base_lr"], t["max_lr"]) for t in trials} == {(1e-4, 1e-3), (1e-4, 2e-2), (1e-2, 2e-2)}
    assert len(dropped) == 1 and "base-lr" in dropped[0]
    trials, _ = grid(build_space(None, ["layers=0,2", "hidden=256"]), {})
    assert [trial_config({}, t).hidden for t in trials] == [(), (256, 256)]


def test_trials_whose_default_rates_do_not_resolve_are_dropped():
    from dogtl.sweeps.run import _resolvable

    trials, _ = grid(build_space(None, ["max_lr=5e-5,1e-3"]), {})  # default base_lr: 1e-4 at batch 16
    kept, configs, refused = _resolvable(trials, {}, [1000, 900])
    assert kept == [{"max_lr": 1e-3}] and configs[0].max_lr == 1e-3
    assert len(refused) == 1 and "--base-lr" in refused[0]
    with pytest.raises(DogtlError, match="no trial of the space"):
        _resolvable(trials[:1], {}, [1000])


def test_random_sampling_is_seeded_distinct_and_in_range():
    space = build_space(None, ["max_lr=log:1e-4..1e-2", "dropout=0.1..0.6", "patience=1..9", "hidden=64,128"])
    a, _ = sample(space, {}, 12, seed=5)
    assert a == sample(space, {}, 12, seed=5)[0]
    assert a != sample(space, {}, 12, seed=6)[0]
    assert len({json.dumps(t, sort_keys=True, default=str) for t in a}) == 12
    for t in a:
        assert 1e-4 <= t["max_lr"] <= 1e-2 and 0.1 <= t["dropout"] <= 0.6
        assert isinstance(t["patience"], int) and 1 <= t["patience"] <= 9 and t["hidden"] in ((64,), (128,))
        assert float(f"{t['max_lr']:.3g}") == t["max_lr"]
    lrs = np.log10([t["max_lr"] for t in sample(space, {}, 200, seed=1)[0]])
    assert lrs.min() < -3.5 and lrs.max() > -2.5  # log-uniform: both decades are visited

    discrete = build_space(None, ["hidden=8,16,32", "max_lr=1e-3,2e-3,3e-3"])
    picked, _ = sample(discrete, {}, 4, seed=0)
    full, _ = grid(discrete, {})
    assert len(picked) == 4 and len({str(t) for t in picked}) == 4 and all(t in full for t in picked)
    assert picked == sample(discrete, {}, 4, seed=0)[0] != sample(discrete, {}, 4, seed=1)[0]
    assert sorted(map(str, sample(discrete, {}, 50, seed=0)[0])) == sorted(map(str, full))  # n >= grid: all
    with pytest.raises(DogtlError, match="ranges need random search"):
        grid(space, {})


def test_space_files_toml_and_json(tmp_path):
    toml = tmp_path / "space.toml"
    toml.write_text('hidden = [512, [1024, 512], "none"]\nmax_lr = {low = 1e-4, high = 1e-2, log = true}\n'
                    'optimizer = "adam"\nclean_only = [true, false]\nstep_size = [100, "none"]\n')
    params = {p.name: p for p in load_space_file(toml)}
    assert params["hidden"].values == ((512,), (1024, 512), ())
    assert params["max_lr"].is_range and params["max_lr"].log and params["max_lr"].low == 1e-4
    assert params["optimizer"].values == ("adam",) and params["clean_only"].values == (True, False)
    js = tmp_path / "space.json"
    js.write_text(json.dumps({"space": {"batch_size": [16, 64], "gamma": [None, 0.999], "base_lr": [1e-4]}}))
    params = {p.name: p for p in load_space_file(js)}
    assert params["batch_size"].values == (16, 64) and params["gamma"].values == (None, 0.999)
    assert parse_param_option("clean-only=true,no").values == (True, False)


@pytest.mark.parametrize("text, needles", [
    ("hiden = [512]\n", [r"unknown parameter 'hiden' \(did you mean hidden\?\)"]),
    ("max_lr = []\n", ["max_lr has an empty list of values"]),
    ("epochs = [10, \"ten\"]\n", [r"epochs value 'ten'", "expected an integer"]),
    ("dropout = [0.2, 1.5]\n", ["dropout value 1.5 is not accepted", r"must be in \[0, 1\)"]),
    ("optimizer = [\"adamw\"]\n", ["optimizer value adamw", "choose one of"]),
    ("max_lr = {low = 1e-2, high = 1e-3}\n", ["low must be below high"]),
    ("cache = [\"a.h5\"]\n", ["'cache' is not a search parameter"]),
    ("max_lr = [1e-3\n", ["not valid TOML"]),
])
def test_bad_space_files_give_one_clear_line(tmp_path, text, needles):
    space = tmp_path / "space.toml"
    space.write_text(text)
    result = run_cli("sweep", "--space", space, "--cache", tmp_path / "absent.h5", "--out", tmp_path / "out")
    assert_clean_error(result, r"--space .*space\.toml", *needles)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, needle", [
    ("max_lr=", "empty list"), ("batch_size=64,big", "batch_size value 'big': expected an integer"),
    ("nope=1", "unknown parameter 'nope'"), ("max_lr", "expected name=value1,value2"),
    ("hidden=12q", "layer sizes"), ("max_lr=log:0..1", "bounds must be positive"),
])
def test_bad_param_options_give_one_clear_line(tmp_path, option, needle):
    result = run_cli("sweep", "--param", option, "--cache", tmp_path / "absent.h5")
    assert_clean_error(result, "--param", needle)


# -- folds -----------------------------------------------------------------------------------

def test_folds_are_stratified_disjoint_and_cover_every_row():
    from dogtl.sweeps.folds import make_folds

    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(4), [10, 17, 25, 8]))
    is_val = rng.random(len(labels)) < 0.2
    folds = make_folds(labels, is_val, 4, seed=1)
    assert len(folds) == 4
    vals = np.concatenate([va for _, va in folds])
    assert sorted(vals) == list(range(len(labels)))  # disjoint and covering
    for train, val in folds:
        assert not set(train) & set(val) and len(train) + len(val) == len(labels)
        counts = np.bincount(labels[val], minlength=4)
        assert np.all(np.abs(counts - np.bincount(labels) / 4) <= 1)  # stratified
    assert [v.tolist() for _, v in make_folds(labels, is_val, 4, seed=1)] == [v.tolist() for _, v in folds]
    (train, val), = make_folds(labels, is_val, None, seed=1)
    assert val.tolist() == np.flatnonzero(is_val).tolist() and train.tolist() == np.flatnonzero(~is_val).tolist()
    with pytest.raises(DogtlError, match="--folds 9: class #3 has only 8"):
        make_folds(labels, is_val, 9, seed=1)


# -- fused training --------------------------------------------------------------------------

@pytest.mark.parametrize("precision, rtol", [("float32", 1e-5), ("bfloat16", 5e-3)])
def test_fused_trials_match_fit_head(tiny_cache, precision, rtol):
    from dogtl.features.cache import open_cache
    from dogtl.sweeps.fused import train_fused
    from dogtl.head.train import fit_head, load_training_data
    from dogtl.sweeps.workers import load_labelled

    cache = open_cache(tiny_cache)
    features, data = load_labelled(cache), load_training_data(cache)
    train_rows, val_rows = np.flatnonzero(~cache.is_val), np.flatnonzero(cache.is_val)
    common = dict(epochs=3, batch_size=16, hidden=(8,), dropout=0.0, input_dropout=0.0, patience=0,
                  precision=precision)
    configs = [HeadConfig(optimizer="rmsprop", schedule="exp_range", seed=1, **common),
               HeadConfig(optimizer="adam", schedule="triangular", max_lr=3e-3, seed=2, label_smoothing=0.2,
                          **common),
               HeadConfig(optimizer="sgd", schedule="triangular2", clean_only=True, seed=3, weight_decay=3.0,
                          **common),
               HeadConfig(optimizer="rmsprop", schedule="constant", base_lr=1e-3, seed=4, label_smoothing=0.1,
                          weight_decay=1.0, **common)]
    for config in configs:
        ref = fit_head(config, data.train_features[:1] if config.clean_only else data.train_features,
                       data.train_labels, data.val_features, data.val_labels, 3)
        (fused,) = train_fused([config], features, cache.labels, train_rows, val_rows, 3)
        assert fused.metrics["epochs_run"] == 3 and fused.metrics["best_epoch"] == ref.metrics["best_epoch"]
        np.testing.assert_allclose([r["val_loss"] for r in fused.history], ref.history["val_loss"], rtol=rtol)
        np.testing.assert_allclose([r["loss"] for r in fused.history], ref.history["loss"], rtol=rtol)
        np.testing.assert_allclose([r["lr"] for r in fused.history], ref.history["lr"], rtol=1e-5)


def test_fused_trials_do_not_depend_on_their_group(tiny_cache):
    from dogtl.features.cache import open_cache
    from dogtl.sweeps.fused import fuse_key, train_fused
    from dogtl.sweeps.workers import load_labelled

    cache = open_cache(tiny_cache)
    features = load_labelled(cache)
    train_rows, val_rows = np.flatnonzero(~cache.is_val), np.flatnonzero(cache.is_val)
    # a group (with dropout, different epochs and patience) gives each trial what it gets alone
    group = [HeadConfig(epochs=e, batch_size=16, hidden=(8,), patience=p, seed=s, dropout=d, max_lr=m)
             for e, p, s, d, m in [(4, 0, 1, 0.5, 1e-3), (1, 0, 2, 0.2, 3e-3), (2, 0, 5, 0.3, 1e-3),
                                   (4, 1, 3, 0.0, 1e-1)]]
    assert len({fuse_key(c) for c in group}) == 1
    done = []
    together = train_fused(group, features, cache.labels, train_rows, val_rows, 3,
                           on_done=lambda i, outcome: done.append(i))  # shrinks to 2 trials after epoch 2
    assert sorted(done) == [0, 1, 2, 3] and done[:2] == [1, 2]  # reported as they finish
    assert [t.metrics["epochs_run"] for t in together[1:3]] == [1, 2]
    for config, fused in zip(group, together):
        (alone,) = train_fused([config], features, cache.labels, train_rows, val_rows, 3)
        assert fused.metrics["epochs_run"] == alone.metrics["epochs_run"]
        np.testing.assert_allclose(fused.metrics["val_log_loss"], alone.metrics["val_log_loss"], rtol=1e-5)


def test_trials_the_fused_path_cannot_reproduce_train_alone(tiny_cache, tmp_path, monkeypatch):
    from dogtl.sweeps import fused as fusedheads
    from dogtl.sweeps.run import run_sweep
    from dogtl.sweeps.settings import SweepConfig

    def refuse(*args, **kwargs):
        raise fusedheads.NotFusable("a head layer it does not know")

    monkeypatch.setattr(fusedheads, "_Trial", refuse)
    result = run_sweep(SweepConfig(cache=str(tiny_cache), out=str(tmp_path / "s"), params=("max_lr=1e-3,3e-3",),
                                   epochs=1))
    runs = [json.loads(p.read_text()) for p in (tmp_path / "s" / "trials").glob("*.json")]
    assert result.runs == 2 and len(runs) == 2 and not any(r["fused"] for r in runs)
    assert all(math.isfinite(v) for v in result.results["val_log_loss"])


def test_plan_tasks_groups_fusable_trials_per_fold():
    from dogtl.sweeps.workers import plan_tasks

    def unit(i, fold, **settings):
        return {"key": f"k{i}-f{fold}", "trial": f"k{i}", "fold": fold, "settings": settings}

    units = [unit(i, f, hidden=[h], max_lr=m) for f in (0, 1) for i, (h, m) in
             enumerate([(8, 1e-3), (8, 2e-3), (8, 3e-3), (16, 1e-3)])]
    folds = [(np.arange(3), np.arange(3, 5)), (np.arange(2), np.arange(2, 5))]
    tasks = plan_tasks(units, folds, fuse=8, jobs=1)
    assert sorted(len(t["units"]) for t in tasks) == [1, 1, 3, 3] and all(t["fuse"] for t in tasks)
    assert all(len({u["fold"] for u in t["units"]}) == 1 for t in tasks)
    assert all(t["val_rows"] is folds[t["fold"]][1] for t in tasks)
    assert sorted(len(t["units"]) for t in plan_tasks(units, folds, fuse=2, jobs=1)) == [1, 1, 1, 1, 2, 2]
    assert sorted(len(t["units"]) for t in plan_tasks(units[:3], folds, fuse=8, jobs=2)) == [1, 2]
    singles = plan_tasks(units, folds, fuse=1, jobs=1)
    assert len(singles) == 8 and not any(t["fuse"] for t in singles)


# -- the command -----------------------------------------------------------------------------

def test_sweep_writes_sorted_results_and_a_best_config_train_head_accepts(tiny_cache, tmp_path):
    out = tmp_path / "sweep"
    result = run_cli("sweep", "--cache", tiny_cache, "--param", "hidden=8,16", "--param", "max_lr=1e-3,5e-3",
                     *NO_DROPOUT, "--epochs", 3, "--out", out)
    assert result.exit_code == 0, result.output
    assert "train the best: dogtl train-head --config" in result.output
    frame = pd.read_csv(out / "results.csv")
    assert len(frame) == 4 and list(frame["rank"]) == [1, 2, 3, 4]
    assert list(frame["val_log_loss"]) == sorted(frame["val_log_loss"])
    assert {"hidden", "max_lr", "val_accuracy", "epochs_run", "seconds", "val_log_loss_std"} <= set(frame.columns)
    assert (frame["epochs_run"] <= 3).all() and (frame["seconds"] > 0).all()
    assert sorted(frame["hidden"].astype(str)) == ["16", "16", "8", "8"]
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((out / "trials").glob("*.json"))) == 4

    best = frame.iloc[0]
    model = tmp_path / "models" / "head.keras"
    model.parent.mkdir()
    trained = run_cli("train-head", "--config", out / "best.toml", "--out", model)
    assert trained.exit_code == 0, trained.output
    meta = json.loads(model.with_suffix(".json").read_text())
    assert meta["settings"]["hidden"] == [int(best["hidden"])] and meta["settings"]["max_lr"] == best["max_lr"]
    assert meta["settings"]["epochs"] == 3 and meta["settings"]["dropout"] == 0
    assert meta["metrics"]["val_log_loss"] == pytest.approx(best["val_log_loss"], rel=1e-4)


def test_interrupted_sweep_resumes_skipping_finished_trials(tiny_cache, tmp_path):
    from dogtl.sweeps.run import run_sweep
    from dogtl.sweeps.settings import SweepConfig

    config = SweepConfig(cache=str(tiny_cache), out=str(tmp_path / "s"), params=("max_lr=1e-3,2e-3,4e-3",
                         "batch_size=32", "dropout=0.1"), epochs=2, folds=2)
    events = []

    def stop_after_two(event):
        events.append(event)
        if event.detail["record"] is not None and event.done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, progress=stop_after_two)
    assert len(list((tmp_path / "s" / "trials").glob("*.json"))) == 2
    assert events[0].total == 6 and events[0].done == 0
    finished = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s" / "trials").glob("*.json")}

    events.clear()
    result = run_sweep(config, progress=events.append)
    assert result.skipped == 2 and result.runs == 4 and result.trials == 3
    assert events[0].done == 2 and [e.done for e in events[1:]] == [3, 4, 5, 6]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s" / "trials").glob("*.json")
            if p.name in finished} == finished  # the finished runs were not run again
    frame = result.results
    assert len(frame) == 3 and (frame["folds"] == 2).all() and frame["val_log_loss_std"].notna().all()

    again = run_sweep(config)
    assert again.runs == 0 and again.skipped == 6
    pd.testing.assert_frame_equal(again.results.drop(columns="seconds"), frame.drop(columns="seconds"))
    other = run_cli("sweep", "--cache", tiny_cache, "--out", tmp_path / "s", "--param", "max_lr=1e-3")
    assert_clean_error(other, "holds another sweep", "--force")


def test_parallel_workers_give_the_same_results(tiny_cache, tmp_path):
    from dogtl.sweeps.run import run_sweep
    from dogtl.sweeps.settings import SweepConfig

    settings = dict(cache=str(tiny_cache), params=("hidden=8,4", "max_lr=1e-3,3e-3"), epochs=2)
    alone = run_sweep(SweepConfig(out=str(tmp_path / "one"), **settings)).results
    parallel = run_sweep(SweepConfig(out=str(tmp_path / "two"), jobs=2, **settings)).results
    pd.testing.assert_frame_equal(alone.drop(columns="seconds"), parallel.drop(columns="seconds"),
                                  check_exact=False, rtol=1e-5)


def test_unknown_backend_or_missing_dask_gives_one_clear_line(tiny_cache, tmp_path):
    result = run_cli("sweep", "--cache", tiny_cache, "--param", "max_lr=1e-3", "--jobs", 2, "--backend", "nosuch",
                     "--out", tmp_path / "s")
    assert_clean_error(result, "--backend nosuch: not a joblib backend", "loky")
    assert not (tmp_path / "s").exists()
    try:
        import distributed  # noqa: F401
    except ImportError:
        result = run_cli("sweep", "--cache", tiny_cache, "--param", "max_lr=1e-3", "--backend", "dask")
        assert_clean_error(result, r"needs Dask: pip install 'dogtl\[dask\]'")


def test_dask_backend_on_a_local_cluster(tiny_cache, tmp_path):
    distributed = pytest.importorskip("distributed")
    from dogtl.sweeps.run import run_sweep
    from dogtl.sweeps.settings import SweepConfig

    settings = dict(cache=str(tiny_cache), params=("max_lr=1e-3,3e-3",), epochs=2)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        result = run_sweep(SweepConfig(out=str(tmp_path / "dask"), backend="dask", jobs=2,
                                       scheduler=cluster.scheduler_address, **settings))
    assert result.runs == 2 and len(result.results) == 2
    alone = run_sweep(SweepConfig(out=str(tmp_path / "alone"), **settings)).results
    pd.testing.assert_frame_equal(alone.drop(columns="seconds"), result.results.drop(columns="seconds"),
                                  check_exact=False, rtol=1e-5)
