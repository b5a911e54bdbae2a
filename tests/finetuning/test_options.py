"""Each fine-tuning option changes what it says it changes: which layers train (N blocks and all),
the rate of every layer (discriminative rates), when each block thaws (gradual unfreezing), the
weight decay, the moving average of the weights, temperature scaling, the schedules against their formulas, the augmentation strengths, label smoothing,
BatchNorm re-estimation, and the reference recipe one option away."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from dogtl.core.errors import DogtlError
from dogtl.core.backbones import get_backbone

SPEC = get_backbone("mobilenet_v2")


@pytest.fixture(scope="module")
def mobilenet():
    """A small mobilenet_v2 (random weights with BatchNorm statistics of the inputs, so that
    activations carry signal; 32 px) and a head on it, composed: (model, backbone, head)."""
    from dogtl.core.models import build_backbone, build_head, calibrate_batchnorm, compose

    backbone = build_backbone(SPEC, "none", 32)
    calibrate_batchnorm(backbone, _images(16))
    head = build_head(SPEC.feature_dim, 3, hidden=(8,))
    return compose(backbone, head), backbone, head


def _images(n: int):
    return np.random.default_rng(0).uniform(-1, 1, (n, 32, 32, 3)).astype("float32")


def _config(**kw):
    from dogtl.finetuning.settings import FinetuneConfig

    return FinetuneConfig(**kw)


def test_trainable_blocks_all_unfreezes_the_whole_backbone_stem_included(mobilenet):
    from dogtl.core.models import is_batchnorm, unfreeze_top_blocks

    _, backbone, _ = mobilenet
    with_weights = [l.name for l in backbone.layers if l.weights and not is_batchnorm(l)]
    assert unfreeze_top_blocks(backbone, SPEC, "all") == with_weights
    assert with_weights[0] == "Conv1"  # the stem, below the first listed block (expanded_conv_)
    assert "Conv1" not in unfreeze_top_blocks(backbone, SPEC, len(SPEC.blocks))
    assert unfreeze_top_blocks(backbone, SPEC, 3) == [
        "block_15_expand", "block_15_depthwise", "block_15_project", "block_16_expand", "block_16_depthwise",
        "block_16_project", "Conv_1"]
    assert all(not l.trainable for l in backbone.layers if is_batchnorm(l))
    assert _config(trainable_blocks="ALL").trainable_blocks == "all" and _config(trainable_blocks="5").trainable_blocks == 5
    for bad in (-1, "some", 2.5, True):
        with pytest.raises(DogtlError, match="--trainable-blocks .*expected a number of blocks"):
            _config(trainable_blocks=bad)


def _compiled(mobilenet, **settings):
    from dogtl.finetuning.model import compile_model, unfreeze

    model, backbone, head = mobilenet
    config = _config(**settings)
    unfreeze(backbone, head, SPEC, config.trainable_blocks)
    compile_model(model, backbone, SPEC, config, steps_per_epoch=5)
    return model, config


def _groups(mobilenet, variables) -> list[str]:
    """For each variable: 'head', 'Conv_1' or its block ('block_16', ...)."""
    _, backbone, head = mobilenet
    layer_of = {id(v): ("head" if layer in head.layers else layer.name)
                for layer in backbone.layers + head.layers for v in layer.trainable_weights}
    names = [layer_of[id(v)] for v in variables]
    return [n if n in ("head", "Conv_1") else "_".join(n.split("_")[:2]) for n in names]


def test_block_lr_decay_gives_each_block_its_rate_and_an_sgd_step_uses_it(mobilenet):
    """Head and top block at the rate, each block below at 0.5 x the one above; one SGD step
    (no momentum yet) moves every variable by exactly -rate x multiplier x gradient."""
    import keras
    import tensorflow as tf

    model, _ = _compiled(mobilenet, trainable_blocks=3, block_lr_decay=0.5, optimizer="sgd", schedule="constant",
                         base_lr=0.1, weight_decay=0.0, warmup_epochs=0)
    opt = model.optimizer
    groups = _groups(mobilenet, model.trainable_variables)
    want = {"head": 1.0, "Conv_1": 1.0, "block_16": 0.5, "block_15": 0.25}
    assert [want[g] for g in groups] == opt.multipliers and set(groups) == set(want)

    before = [v.numpy() for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(np.array([0, 1, 2, 0]), model(_images(4))))
    grads = tape.gradient(loss, model.trainable_variables)
    opt.apply(grads, model.trainable_variables)
    for v, b, g, m in zip(model.trainable_variables, before, grads, opt.multipliers):
        g = np.asarray(g)
        assert np.abs(g).max() > 1e-6, v.path  # the check below is not vacuous
        np.testing.assert_allclose(v.numpy() - b, -0.1 * m * g, rtol=1e-3, atol=1e-4 * np.abs(g).max(), err_msg=v.path)


def test_layer_rates_thaw_each_block_at_its_epoch_and_decay_kernels_only(mobilenet):
    model, config = _compiled(mobilenet, trainable_blocks=3, unfreeze_every=2, optimizer="adamw", weight_decay=0.01)
    opt = model.optimizer
    groups = _groups(mobilenet, model.trainable_variables)
    for v, group, thaw, decay in zip(model.trainable_variables, groups, opt.thaw_steps, opt.decays):
        depth = {"head": 1, "Conv_1": 1, "block_16": 2, "block_15": 3}[group]
        assert thaw == (depth - 1) * 2 * 5, v.path  # (blocks below the top) x 2 epochs x 5 steps per epoch
        assert decay == (0.0 if v.name == "bias" else 0.01), v.path


def test_a_held_block_neither_moves_nor_decays_until_its_step():
    """Gradual unfreezing in the optimizer: rate 0 (and no weight decay) before the thaw step."""
    import keras

    from dogtl.finetuning.optimizer import make_optimizer

    a, b = keras.Variable(np.ones(3, "float32"), name="kernel"), keras.Variable(np.ones(3, "float32"), name="kernel")
    opt = make_optimizer("adamw", 0.1, ([1.0, 0.5], [0, 2], [0.01, 0.01]))
    seen = []
    for _ in range(4):
        opt.apply([np.ones(3, "float32")] * 2, [a, b])
        seen.append((float(a.numpy()[0]), float(b.numpy()[0])))
    assert [s[1] for s in seen[:2]] == [1.0, 1.0]  # held for steps 0 and 1
    assert seen[2][1] < 1.0 and all(s[0] < p[0] for s, p in zip(seen[1:], seen))
    # step 2 of b: decoupled decay at half the rate, then Adam's first step (lr x 1 for a unit gradient)
    assert seen[2][1] == pytest.approx(1.0 - 0.05 * 0.01 - 0.05, rel=1e-4)
    with pytest.raises(ValueError, match="2 layer rates for 1 variables"):
        make_optimizer("sgd", 0.1, ([1.0, 1.0], [0, 0], [0.0, 0.0])).build([a])


def test_ema_epochs_validates_the_moving_average_and_trains_on_the_raw_weights(mobilenet):
    """--ema-epochs: at each epoch's end the model holds Keras's moving average of the weights after
    every step (momentum 1 - 1 / (epochs x steps), the first step's weights to start), and the next
    epoch trains on from the raw weights."""
    import keras

    from dogtl.core.keras_private import swap_ema_weights

    model, config = _compiled(mobilenet, trainable_blocks=1, optimizer="sgd", schedule="constant", base_lr=0.05,
                              ema_epochs=0.4)
    assert config.ema_momentum(5) == pytest.approx(0.5) and _config(ema_epochs=0).ema_momentum(5) is None
    assert _config().ema_momentum(5) == pytest.approx(0.8)  # the default: one epoch of 5 steps
    variables = model.trainable_variables
    steps, ends, starts = [], [], []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda b, logs: steps.append([v.numpy().copy() for v in variables]),
        on_epoch_end=lambda e, logs: ends.append([v.numpy().copy() for v in variables]),
        on_epoch_begin=lambda e, logs: starts.append([v.numpy().copy() for v in variables]))
    x, y = _images(10), np.arange(10) % 3
    model.fit(x, y, batch_size=2, epochs=2, shuffle=False, verbose=0, callbacks=[swap_ema_weights(False), record])
    average = steps[0]
    for step in steps[1:5]:
        average = [0.5 * a + 0.5 * w for a, w in zip(average, step)]
    for got, want, raw in zip(ends[0], average, steps[4]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert any(not np.allclose(got, raw) for got, raw in zip(ends[0], steps[4]))  # not the last step's weights
    for got, raw in zip(starts[1], steps[4]):  # epoch 2 starts from the raw weights (swapped by additions)
        np.testing.assert_allclose(got, raw, rtol=1e-5, atol=1e-7)


def test_one_cycle_follows_its_formula():
    """A half cosine up from base to max over the warm-up, then a half cosine down to 0."""
    from keras import ops

    from dogtl.finetuning.model import learning_rate
    from dogtl.core.schedules import OneCycleLR, one_cycle_lr

    base, peak, w, t = 1e-4, 1e-3, 6, 20
    for it, want in [(0, base), (3, base + (peak - base) / 2), (6, peak), (13, peak / 2), (20, 0.0), (25, 0.0)]:
        assert one_cycle_lr(it, base, peak, w, t) == pytest.approx(want, abs=1e-12), it
    for it in (1, 8, 17):
        down = (1 + math.cos(math.pi * (it - w) / (t - w))) / 2 if it >= w else 1.0
        up = (1 - math.cos(math.pi * it / w)) / 2 if it < w else 1.0
        assert one_cycle_lr(it, base, peak, w, t) == pytest.approx((base + (peak - base) * up) * down)
    schedule = learning_rate(_config(schedule="one_cycle", base_lr=base, max_lr=peak, epochs=4, warmup_epochs=0), 5)
    assert isinstance(schedule, OneCycleLR) and (schedule.warmup_steps, schedule.total_steps) == (6, 20)  # 30%
    for it in range(0, 22, 3):
        assert float(ops.convert_to_numpy(schedule(it))) == pytest.approx(one_cycle_lr(it, base, peak, 6, 20),
                                                                          rel=1e-5, abs=1e-9)


def test_cosine_warms_up_linearly_then_follows_a_half_cosine_to_base_lr():
    from keras import ops

    from dogtl.finetuning.model import learning_rate
    from dogtl.core.schedules import Warmup

    base, peak = 1e-5, 1e-3
    schedule = learning_rate(_config(schedule="cosine", base_lr=base, max_lr=peak, epochs=5, warmup_epochs=1), 4)
    w, t = 4, 20

    def formula(it):
        if it < w:
            return base + (peak - base) * it / w
        return base + (peak - base) * (1 + math.cos(math.pi * min(it - w, t - w) / (t - w))) / 2

    for it in (0, 2, 4, 9, 12, 19, 20, 30):
        assert float(ops.convert_to_numpy(schedule(it))) == pytest.approx(formula(it), rel=1e-5), it
    plain = learning_rate(_config(schedule="cosine", base_lr=base, max_lr=peak, epochs=5, warmup_epochs=0), 4)
    assert float(ops.convert_to_numpy(plain(0))) == pytest.approx(peak)
    assert float(ops.convert_to_numpy(plain(10))) == pytest.approx((base + peak) / 2, rel=1e-5)
    warm = learning_rate(_config(schedule="constant", base_lr=base, warmup_epochs=2), 4)
    assert isinstance(warm, Warmup) and float(ops.convert_to_numpy(warm(3))) == pytest.approx(base / 2)


def test_augment_presets_and_their_strengths():
    """light: small rotations and zooms, the extraction's flips; recipe: the reference recipe's;
    a light warp moves pixels less than the recipe's for the same random draw."""
    import tensorflow as tf

    from dogtl.data.augment import AugmentConfig, augment, augment_preset, image_seed
    from dogtl.finetuning.data import training_augmentation

    cached = AugmentConfig(rotation=20, zoom=0.2, shift=0.0, hflip=False)
    assert augment_preset("light", cached) == AugmentConfig(rotation=10, zoom=0.1, shift=0.1, hflip=False)
    assert augment_preset("recipe", cached) == AugmentConfig() and AugmentConfig().rotation == 45
    assert augment_preset("none", cached) is None and augment_preset("cache", cached) == cached
    assert training_augmentation("light", cached.as_dict(), from_cache=False) == augment_preset("light", cached)
    assert training_augmentation("cache", cached.as_dict(), from_cache=True) == cached
    assert training_augmentation("none", cached.as_dict(), from_cache=True) is None
    assert training_augmentation("none", cached.as_dict(), from_cache=False) is None
    assert _config().augment == "none"
    with pytest.raises(DogtlError, match="--augment light with --from-cache, but the cache's passes"):
        training_augmentation("light", cached.as_dict(), from_cache=True)

    yy, xx = np.mgrid[0:48, 0:48]
    image = tf.constant(np.stack([xx, yy, xx * yy / 48], -1).astype("float32") / 48)
    unflipped = {name: replace(augment_preset(name, AugmentConfig()), hflip=False) for name in ("light", "recipe")}
    moved = {name: np.mean([float(tf.reduce_mean(tf.abs(augment(image, config, image_seed(7, 1, i)) - image)))
                            for i in range(8)]) for name, config in unflipped.items()}
    assert 0 < moved["light"] < moved["recipe"] / 2, moved


def test_label_smoothing_loss_is_keras_smoothed_cross_entropy():
    import keras

    from dogtl.finetuning.optimizer import SmoothedCrossentropy

    p = np.random.default_rng(1).dirichlet(np.ones(4), 5).astype("float32")
    y = np.array([0, 3, 1, 1, 2])
    want = keras.losses.CategoricalCrossentropy(label_smoothing=0.2)(np.eye(4)[y], p)
    assert float(SmoothedCrossentropy(0.2)(y, p)) == pytest.approx(float(want), rel=1e-5)
    plain = keras.losses.SparseCategoricalCrossentropy()(y, p)
    assert float(SmoothedCrossentropy()(y, p)) == pytest.approx(float(plain), rel=1e-5)
    assert float(SmoothedCrossentropy(0.2)(y, p)) != pytest.approx(float(plain), rel=1e-3)
    assert SmoothedCrossentropy.from_config(SmoothedCrossentropy(0.1).get_config()).label_smoothing == 0.1


def test_batchnorm_reestimation_averages_the_chosen_layers_statistics_over_the_batches():
    import keras

    from dogtl.core.models import reestimate_batchnorm

    inputs = keras.Input((4,))
    first = keras.layers.BatchNormalization(name="first")
    second = keras.layers.BatchNormalization(name="second")
    dense = keras.layers.Dense(3, name="dense")
    model = keras.Model(inputs, second(dense(first(inputs))))
    model.trainable = False
    dense.trainable = True
    rng = np.random.default_rng(2)
    batches = [rng.normal(5.0, 3.0, (16, 4)).astype("float32") for _ in range(3)]
    reestimate_batchnorm(model, batches, [second])
    outputs = [np.asarray(dense(first(b, training=False))) for b in batches]  # `first` kept its statistics
    np.testing.assert_allclose(second.moving_mean.numpy(), np.mean([o.mean(0) for o in outputs], 0), rtol=1e-4)
    np.testing.assert_allclose(second.moving_variance.numpy(), np.mean([o.var(0) for o in outputs], 0), rtol=1e-3)
    np.testing.assert_array_equal(first.moving_mean.numpy(), np.zeros(4))
    assert (model.trainable, first.trainable, second.trainable, dense.trainable) == (False, False, False, True)
    assert second.momentum == 0.99


def test_reestimation_picks_the_unfrozen_blocks_and_the_heads_batchnorm(mobilenet):
    from dogtl.finetuning.model import unfrozen_batchnorm

    _, backbone, head = mobilenet
    names = [layer.name for layer in unfrozen_batchnorm(backbone, head, SPEC, 2)]
    assert names == ["block_16_expand_BN", "block_16_depthwise_BN", "block_16_project_BN", "Conv_1_bn", "head_bn"]
    every = unfrozen_batchnorm(backbone, head, SPEC, "all")
    assert every[0].name == "bn_Conv1" and len(every) == 1 + sum(
        1 for layer in backbone.layers if layer.__class__.__name__ == "BatchNormalization")


def test_calibrate_finds_the_temperature_that_undoes_overconfidence_and_folds_it_into_the_model():
    """--calibrate: fit_temperature recovers the temperature of probabilities made overconfident
    by a known factor, keeps every predicted class, and fold_temperature makes the model's own
    outputs those tempered probabilities."""
    import keras

    from dogtl.core.metrics import fit_temperature, log_loss, tempered
    from dogtl.core.models import build_head, fold_temperature

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (4000, 5))
    truth = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(5, p=p) for p in truth])
    overconfident = tempered(truth, 1 / 2.5)  # logits x 2.5
    t = fit_temperature(labels, overconfident)
    assert t == pytest.approx(2.5, rel=0.1)
    assert log_loss(labels, tempered(overconfident, t)) < log_loss(labels, overconfident) - 0.1
    assert (tempered(overconfident, t).argmax(1) == overconfident.argmax(1)).all()
    assert fit_temperature(labels, np.full_like(truth, np.nan)) == 1.0

    head = build_head(12, 5, hidden=(8,))
    x = rng.normal(0, 1, (6, 12)).astype("float32")
    before = head.predict(x, verbose=0)
    fold_temperature(head, 1.7)
    np.testing.assert_allclose(head.predict(x, verbose=0), tempered(before, 1.7), atol=1e-5)
    with pytest.raises(DogtlError, match="does not end in a Dense softmax layer"):
        fold_temperature(keras.Sequential([keras.Input((12,)), keras.layers.Dense(5)]), 2.0)  # logits out


def test_the_reference_recipe_is_one_option_away():
    from dogtl.finetuning.settings import RECIPES, recipe_settings

    reference = _config(**recipe_settings("reference"))
    assert (reference.optimizer, reference.schedule, reference.base_lr, reference.trainable_blocks,
            reference.augment, reference.batch_size, reference.calibrate) == ("sgd", "constant", 1e-4, 2, "recipe", 16, False)
    assert set(RECIPES["reference"]) <= {s.name for s in reference.SETTINGS}
    with pytest.raises(DogtlError, match="--recipe 'fast': choose one of reference"):
        recipe_settings("fast")
