"""Cyclical learning rates: the formula at chosen iterations, the Keras adapter, save/load."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dogtl.core.errors import DogtlError
from dogtl.core.schedules import CyclicLR, cyclic_lr, make_optimizer

BASE, MAX, STEP = 1e-4, 1e-3, 10
AMP = MAX - BASE


# Hand-worked values: cycle = floor(1 + it/20), x = |it/10 - 2 cycle + 1|.
@pytest.mark.parametrize("it, expected", [
    (0, BASE),                  # cycle 1, x = 1: bottom
    (5, BASE + 0.5 * AMP),      # half way up
    (10, MAX),                  # x = 0: top
    (15, BASE + 0.5 * AMP),     # half way down
    (20, BASE),                 # bottom again, cycle 2 starts
    (27, BASE + 0.7 * AMP),     # cycle 2, x = 0.3
    (30, MAX),                  # top of cycle 2
])
def test_triangular_values(it, expected):
    assert cyclic_lr(it, BASE, MAX, STEP, "triangular") == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("it, expected", [
    (10, MAX),                          # cycle 1: full amplitude
    (30, BASE + AMP / 2),               # cycle 2: half
    (35, BASE + 0.5 * AMP / 2),
    (50, BASE + AMP / 4),               # cycle 3: a quarter
    (60, BASE),
])
def test_triangular2_values(it, expected):
    assert cyclic_lr(it, BASE, MAX, STEP, "triangular2") == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("it, expected", [
    (0, BASE),
    (10, BASE + AMP * 0.99 ** 10),
    (15, BASE + 0.5 * AMP * 0.99 ** 15),
    (30, BASE + AMP * 0.99 ** 30),
])
def test_exp_range_values(it, expected):
    assert cyclic_lr(it, BASE, MAX, STEP, "exp_range", gamma=0.99) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("mode", ["triangular", "triangular2", "exp_range"])
def test_keras_schedule_matches_formula(mode):
    schedule = CyclicLR(BASE, MAX, 7, mode=mode, gamma=0.995)
    its = np.arange(0, 200, 3)
    got = np.array([float(schedule(i)) for i in its])
    want = np.array([cyclic_lr(int(i), BASE, MAX, 7, mode, gamma=0.995) for i in its])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got.min() >= BASE * (1 - 1e-6) and got.max() <= MAX * (1 + 1e-6)


def test_schedule_config_round_trip():
    import keras

    schedule = CyclicLR(2e-4, 3e-3, 40, mode="triangular2", gamma=0.9)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert isinstance(again, CyclicLR) and again.get_config() == schedule.get_config()
    assert float(again(55)) == pytest.approx(float(schedule(55)))


def test_head_with_schedule_saves_and_loads(tmp_path):
    """A compiled head whose optimizer runs on CyclicLR survives save/load, schedule and all."""
    import keras

    from dogtl.core.artifacts import load_model, save_model
    from dogtl.core.metadata import ModelMetadata
    from dogtl.core.models import build_head

    keras.utils.set_random_seed(0)
    head = build_head(8, 3, hidden=(4,))
    schedule = CyclicLR(1e-4, 1e-3, 5, mode="exp_range", gamma=0.999)
    head.compile(optimizer=make_optimizer("rmsprop", schedule), loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).standard_normal((16, 8)).astype("float32")
    head.fit(x, np.arange(16) % 3, epochs=1, batch_size=8, verbose=0)  # iterations = 2
    path = tmp_path / "head.keras"
    save_model(head, path, ModelMetadata(kind="head"))
    loaded, meta = load_model(path)
    assert meta.kind == "head"
    saved = loaded.optimizer.get_config()["learning_rate"]
    assert saved["registered_name"] == "dogtl>CyclicLR" and saved["config"] == schedule.get_config()
    assert int(loaded.optimizer.iterations.numpy()) == 2
    assert float(loaded.optimizer.learning_rate) == pytest.approx(cyclic_lr(2, 1e-4, 1e-3, 5, "exp_range", 0.999),
                                                                  rel=1e-5)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), head.predict(x, verbose=0), rtol=1e-6)


def test_optimizers():
    import keras

    rms = make_optimizer("rmsprop", 1e-3)
    assert isinstance(rms, keras.optimizers.RMSprop) and rms.rho == pytest.approx(0.9)
    assert isinstance(make_optimizer("adam", 1e-3), keras.optimizers.Adam)
    sgd = make_optimizer("sgd", 1e-2)
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.momentum == pytest.approx(0.9)
    with pytest.raises(DogtlError, match="adagrad"):
        make_optimizer("adagrad", 1e-3)


@pytest.mark.parametrize("args, needle", [
    ((-1e-4, 1e-3, 10, "triangular", 1.0), "must be > 0"),
    ((1e-2, 1e-3, 10, "triangular", 1.0), "above the max"),
    ((1e-4, 1e-3, 0, "triangular", 1.0), "step size"),
    ((1e-4, 1e-3, 10, "sawtooth", 1.0), "sawtooth"),
    ((1e-4, 1e-3, 10, "exp_range", 1.5), "gamma"),
])
def test_bad_schedule_values(args, needle):
    with pytest.raises(DogtlError, match=needle):
        cyclic_lr(0, *args)
    with pytest.raises(DogtlError, match=needle):
        CyclicLR(*args[:3], mode=args[3], gamma=args[4])


def test_exp_range_decays_over_cycles():
    peaks = [cyclic_lr(STEP * (2 * k + 1), BASE, MAX, STEP, "exp_range", gamma=0.99) for k in range(4)]
    assert all(a > b for a, b in zip(peaks, peaks[1:]))
    assert peaks[1] - BASE == pytest.approx(AMP * 0.99 ** 30) and not math.isnan(peaks[-1])


def test_the_cyclical_modes_are_the_head_schedules_but_constant():
    """core.schedules names its modes itself (core imports no stage); they must stay train-head's choices."""
    from dogtl.core.schedules import MODES
    from dogtl.head.settings import SCHEDULES

    assert MODES == tuple(s for s in SCHEDULES if s != "constant")
