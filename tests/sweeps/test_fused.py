"""The fused sweep path against `fit_head`, for every optimizer, schedule and loss setting.

Each fused trial must train exactly as `fit_head` trains the same settings: same losses and
learning rates per epoch, and the same weights (BatchNorm's moving statistics included) at
the epoch `fit_head` keeps. Tiny arrays, large rates and decays: a wrong optimizer, schedule,
decay, smoothing or dropout formula moves the numbers far beyond float rounding.
"""

from __future__ import annotations

import numpy as np
import pytest

from dogtl.head.settings import HeadConfig

ROWS, VAL, DIM, CLASSES, PASSES = 48, 16, 6, 3, 2
# Every schedule once per optimizer, with weight decay and label smoothing on and off, dropout on two.
TRIALS = [dict(schedule="constant"),
          dict(schedule="triangular", weight_decay=0.5),
          dict(schedule="triangular2", label_smoothing=0.2, dropout=0.3),
          dict(schedule="exp_range", weight_decay=0.5, label_smoothing=0.2, input_dropout=0.2)]
COMMON = dict(epochs=2, batch_size=16, hidden=(5,), dropout=0.0, input_dropout=0.0, patience=0,
              precision="float32", base_lr=2e-3, max_lr=2e-2, step_size=2, gamma=0.8)


@pytest.fixture(scope="module")
def data():
    """[PASSES, ROWS + VAL, DIM] float32 features of CLASSES separable classes; the last VAL rows validate."""
    rng = np.random.default_rng(7)
    labels = rng.integers(0, CLASSES, ROWS + VAL).astype(np.int32)
    centres = rng.standard_normal((CLASSES, DIM)) * 2
    features = (centres[labels][None] + rng.standard_normal((PASSES, ROWS + VAL, DIM))).astype(np.float32)
    return features, labels


def fused_epochs(configs, features, labels):
    """Train `configs` as one fused group: per epoch, each trial's (mean loss, lr, weights)."""
    from dogtl.sweeps.fused import FusedHeads

    group = FusedHeads(configs, features, labels, np.arange(ROWS), features[0, ROWS:], CLASSES)
    epochs = []
    for epoch in range(1, configs[0].epochs + 1):
        losses, _ = group.run_epoch(epoch)
        lrs = group.lr_at(epoch * group.steps - 1)
        epochs.append([(losses[:, t].mean(), lrs[t], trial.model.get_weights())
                       for t, trial in enumerate(group.trials)])
    return epochs


@pytest.mark.parametrize("optimizer", ["rmsprop", "adam", "sgd"])
def test_fused_trials_train_as_fit_head(data, optimizer):
    from dogtl.head.train import fit_head

    features, labels = data
    configs = [HeadConfig(optimizer=optimizer, seed=10 + i, **{**COMMON, **trial}) for i, trial in enumerate(TRIALS)]
    fused = fused_epochs(configs, features, labels)
    for t, config in enumerate(configs):
        ref = fit_head(config, features[:, :ROWS], labels[:ROWS], features[0, ROWS:], labels[ROWS:], CLASSES)
        np.testing.assert_allclose([e[t][0] for e in fused], ref.history["loss"], rtol=1e-5, err_msg=str(config))
        np.testing.assert_allclose([e[t][1] for e in fused], ref.history["lr"], rtol=1e-6, err_msg=str(config))
        kept = fused[ref.metrics["best_epoch"] - 1][t][2]
        names = [w.path for w in ref.model.weights]
        assert any("moving_mean" in n for n in names) and any("moving_variance" in n for n in names)
        for name, got, want in zip(names, kept, ref.model.get_weights()):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=f"{name} of {config}")
