"""The augmentation: the reference recipe's ranges, and pass p of image i as a pure
function of (seed, p, i)."""

from __future__ import annotations

import numpy as np
import pytest

from dogtl.data.augment import AugmentConfig, augment, image_seed

SIZE = 64
CENTRE = (SIZE - 1) / 2


def _blob(x, y, size=SIZE, sigma=2.0):
    yy, xx = np.mgrid[0:size, 0:size]
    g = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)).astype(np.float32)
    return np.repeat(g[..., None], 3, axis=-1) * 255


def _centroid(image):
    w = np.asarray(image)[..., 0]
    yy, xx = np.mgrid[0:w.shape[0], 0:w.shape[1]]
    return np.array([(w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()])


def _outputs(image, config, n=40, seed=2018, pass_index=1):
    return [augment(image, config, image_seed(seed, pass_index, i)).numpy() for i in range(n)]


def test_image_seed_depends_on_seed_pass_and_index_only():
    base = image_seed(2018, 1, 7).numpy()
    assert np.array_equal(base, image_seed(2018, 1, 7).numpy())
    others = [image_seed(2019, 1, 7), image_seed(2018, 2, 7), image_seed(2018, 1, 8)]
    assert all(not np.array_equal(base, o.numpy()) for o in others)


def test_same_key_same_image_and_different_keys_differ():
    image = _blob(20, 30)
    config = AugmentConfig()
    a = augment(image, config, image_seed(2018, 3, 5)).numpy()
    assert np.array_equal(a, augment(image, config, image_seed(2018, 3, 5)).numpy())
    assert not np.allclose(a, augment(image, config, image_seed(2018, 4, 5)).numpy())
    assert a.shape == image.shape and a.dtype == np.float32


def test_all_ranges_zero_is_the_identity():
    image = np.random.default_rng(0).uniform(0, 255, (SIZE, SIZE, 3)).astype(np.float32)
    for out in _outputs(image, AugmentConfig(rotation=0, zoom=0, shift=0, hflip=False), n=5):
        assert np.allclose(out, image, atol=1e-3)


def test_hflip_mirrors_about_half_of_the_images():
    image = np.random.default_rng(1).uniform(0, 255, (SIZE, SIZE, 3)).astype(np.float32)
    flipped = 0
    for out in _outputs(image, AugmentConfig(rotation=0, zoom=0, shift=0, hflip=True)):
        is_flip = np.allclose(out, image[:, ::-1], atol=1e-3)
        assert is_flip or np.allclose(out, image, atol=1e-3)
        flipped += is_flip
    assert 8 <= flipped <= 32


def test_shifts_stay_within_twenty_percent_and_use_the_range():
    image = _blob(CENTRE, CENTRE)
    moves = np.array([_centroid(o) - CENTRE for o in _outputs(image, AugmentConfig(0, 0, 0.2, False))])
    assert np.abs(moves).max() <= 0.2 * SIZE + 0.5
    assert np.abs(moves[:, 0]).max() > 0.12 * SIZE and np.abs(moves[:, 1]).max() > 0.12 * SIZE


def test_rotation_stays_within_45_degrees_and_uses_the_range():
    start = np.array([CENTRE + 20, CENTRE])
    image = _blob(*start)
    angles = []
    for out in _outputs(image, AugmentConfig(rotation=45, zoom=0, shift=0, hflip=False)):
        v = _centroid(out) - CENTRE
        angles.append(np.degrees(np.arctan2(v[1], v[0])))
        assert np.hypot(*v) == pytest.approx(20, abs=0.7)  # a pure rotation about the centre
    angles = np.array(angles)
    assert np.abs(angles).max() <= 45.5
    assert angles.min() < -25 and angles.max() > 25


def test_zoom_stays_within_25_percent_and_goes_both_ways():
    image = _blob(CENTRE + 16, CENTRE)
    ratios = np.array([np.hypot(*(_centroid(o) - CENTRE)) / 16
                       for o in _outputs(image, AugmentConfig(rotation=0, zoom=0.25, shift=0, hflip=False))])
    assert ratios.min() >= 0.75 - 0.03 and ratios.max() <= 1.25 + 0.03
    assert ratios.min() < 0.88 and ratios.max() > 1.12


def test_default_config_is_the_reference_recipe():
    assert AugmentConfig().as_dict() == {"rotation": 45.0, "zoom": 0.25, "shift": 0.2, "hflip": True}


@pytest.mark.parametrize("kwargs,message", [({"rotation": -1}, "rotation"), ({"zoom": 1.0}, "zoom"),
                                            ({"shift": -0.1}, "shift")])
def test_bad_ranges_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AugmentConfig(**kwargs)


def test_pipeline_augmentation_depends_on_the_index_not_on_order_or_company(odd_images):
    """Pass p of image i is the same whichever other images, order and batch size surround it."""
    from dogtl.core.backbones import get_backbone
    from dogtl.data.images import image_dataset

    spec = get_backbone("resnet50")
    names = ["rgb", "png", "grey", "cmyk"]
    paths = [odd_images[n] for n in names]

    def images(order, batch_size, pass_index=1, seed=2018):
        ds = image_dataset([paths[k] for k in order], spec, 32, indices=order, pass_index=pass_index,
                           seed=seed, augmentation=AugmentConfig(), batch_size=batch_size)
        out = {}
        for _, index, batch in ds:
            out.update({int(i): b for i, b in zip(index.numpy(), batch.numpy())})
        return out

    a = images([0, 1, 2, 3], 4)
    b = images([3, 1, 0], 1)
    assert set(b) == {0, 1, 3}
    for i in b:
        assert np.array_equal(a[i], b[i])
    assert not np.allclose(a[0], images([0], 1, pass_index=2)[0])
    assert not np.allclose(a[0], images([0], 1, seed=1)[0])
    clean = images([0, 1], 2, pass_index=0)
    assert not np.allclose(a[0], clean[0])


@pytest.mark.parametrize("shape", [(SIZE, SIZE, 3), (37, 53, 3), (20, 16, 1)])
def test_the_warp_samples_as_tensorflows_projective_transform_op(shape):
    """The compiled warp is TF's ImageProjectiveTransformV3 (bilinear, edges repeated) to float
    rounding, for every kind of draw, edges included."""
    import tensorflow as tf

    from dogtl.data.augment import _warp_fn

    image = np.random.default_rng(2).uniform(0, 255, shape).astype(np.float32)
    for k in range(12):
        u = np.random.default_rng(k).uniform(-1, 1, 6).astype(np.float32)
        t = np.array([1 + 0.4 * u[0], 0.5 * u[1], 8 * u[2], -0.5 * u[1], 1 - 0.4 * u[3], 8 * u[4]], np.float32)
        if k % 3 == 0:
            t[0] = -t[0]  # mirrored
        ours = _warp_fn()(tf.constant(image), tf.constant(t)).numpy()
        theirs = tf.raw_ops.ImageProjectiveTransformV3(
            images=image[None], transforms=np.append(t, [0, 0])[None].astype(np.float32),
            output_shape=shape[:2], fill_value=0.0, interpolation="BILINEAR", fill_mode="NEAREST")[0].numpy()
        assert ours.shape == shape
        np.testing.assert_allclose(ours, theirs, atol=0.02)
        assert not np.allclose(ours, image, atol=1)  # the draw moved pixels: the comparison is not of identities
