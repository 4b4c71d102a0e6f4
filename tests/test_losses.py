"""Losses: hand-computed adversarial values, gradient penalty, VGG extractor, Per-Pix total."""

from __future__ import annotations

import math
import os
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from srgan.config import ADV_LOSSES, LossConfig, VggConfig, section
from srgan.losses import (
    ADVERSARIAL,
    VggPreprocess,
    build_vgg_extractor,
    gradient_penalty,
    per_pix_loss,
    pixel_mse,
    r1_penalty,
    vgg_loss,
)

REAL = [2.0, -1.0]
FAKE = [0.5, -3.0]


def _logits(values):
    return tf.constant(values, shape=(len(values), 1), dtype=tf.float32)  # D's (B, 1) output


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def bce(x: float, t: float) -> float:
    """Plain (unstable but exact here) binary cross-entropy of logit x against target t."""
    return -(t * math.log(sig(x)) + (1 - t) * math.log(1 - sig(x)))


# Hand-computed (D loss, G loss) for REAL / FAKE, written out formula by formula.
_MINIMAX_D = mean(-math.log(sig(r)) for r in REAL) + mean(-math.log(1 - sig(f)) for f in FAKE)
_MF, _MR = mean(FAKE), mean(REAL)
EXPECTED = {
    "minimax": (_MINIMAX_D, mean(math.log(1 - sig(f)) for f in FAKE)),
    "modified": (_MINIMAX_D, mean(-math.log(sig(f)) for f in FAKE)),
    "least_squares": (
        0.5 * mean((r - 1) ** 2 for r in REAL) + 0.5 * mean(f**2 for f in FAKE),
        0.5 * mean((f - 1) ** 2 for f in FAKE),
    ),
    "wasserstein_gp": (mean(FAKE) - mean(REAL), -mean(FAKE)),
    "hinge": (
        mean(max(0.0, 1 - r) for r in REAL) + mean(max(0.0, 1 + f) for f in FAKE),
        -mean(FAKE),
    ),
    "relativistic_average": (
        mean(bce(r - _MF, 1) for r in REAL) + mean(bce(f - _MR, 0) for f in FAKE),
        mean(bce(f - _MR, 1) for f in FAKE) + mean(bce(r - _MF, 0) for r in REAL),
    ),
}


def test_table_matches_config_names():
    assert tuple(ADVERSARIAL) == ADV_LOSSES
    assert [n for n, a in ADVERSARIAL.items() if a.needs_gradient_penalty] == ["wasserstein_gp"]
    assert {n for n, a in ADVERSARIAL.items() if a.uses_label_smoothing} == {"minimax", "modified"}


@pytest.mark.parametrize("name", ADV_LOSSES)
def test_adversarial_hand_values(name):
    loss = ADVERSARIAL[name]
    d, g = EXPECTED[name]
    real, fake = _logits(REAL), _logits(FAKE)
    assert float(loss.d_loss(real, fake)) == pytest.approx(d, rel=1e-5)
    assert float(loss.g_loss(real, fake)) == pytest.approx(g, rel=1e-5)
    # 1-D logits give the same means
    assert float(loss.d_loss(tf.constant(REAL), tf.constant(FAKE))) == pytest.approx(d, rel=1e-5)


@pytest.mark.parametrize("name", ["minimax", "modified"])
def test_label_smoothing_one_sided(name):
    s = 0.1
    # real target 1 - s, fake target unchanged at 0
    hand = mean(bce(r, 1 - s) for r in REAL) + mean(bce(f, 0) for f in FAKE)
    got = ADVERSARIAL[name].d_loss(_logits(REAL), _logits(FAKE), label_smoothing=s)
    assert float(got) == pytest.approx(hand, rel=1e-5)


@pytest.mark.parametrize("name", ADV_LOSSES)
def test_adversarial_stable_for_large_logits(name):
    loss = ADVERSARIAL[name]
    real, fake = _logits([200.0, -200.0]), _logits([-200.0, 200.0])
    for value in (loss.d_loss(real, fake), loss.g_loss(real, fake)):
        assert np.isfinite(float(value))
    if name in ("minimax", "modified"):
        # softplus form: a confident, correct D has ~0 loss (log-sigmoid form would give nan/inf)
        assert float(loss.d_loss(_logits([200.0]), _logits([-200.0]))) == pytest.approx(0.0, abs=1e-6)


def _linear_critic(scale: float) -> keras.Model:
    inp = keras.Input((4, 4, 3))
    out = keras.layers.Dense(1)(keras.layers.Flatten()(inp))
    critic = keras.Model(inp, out)
    dense = critic.layers[-1]
    w = np.random.default_rng(0).standard_normal((48, 1)).astype(np.float32)
    dense.set_weights([scale * w / np.linalg.norm(w), np.zeros(1, np.float32)])
    return critic


def _pair(seed: int = 0):
    rng = np.random.default_rng(seed)
    return (tf.constant(rng.random((3, 4, 4, 3), dtype=np.float32)),
            tf.constant(rng.random((3, 4, 4, 3), dtype=np.float32)))


@pytest.mark.parametrize("rng", [7, "seedgen", "tfgen", [1, 2]])
def test_gradient_penalty_unit_norm_linear_critic_is_zero(rng):
    if rng == "seedgen":
        rng = keras.random.SeedGenerator(3)
    elif rng == "tfgen":
        rng = tf.random.Generator.from_seed(3)
    real, fake = _pair()
    assert float(gradient_penalty(_linear_critic(1.0), real, fake, rng)) == pytest.approx(0.0, abs=1e-6)


def test_gradient_penalty_positive_otherwise_and_differentiable():
    real, fake = _pair()
    # linear critic with ||w|| = 3: every gradient norm is 3 -> penalty (3 - 1)^2
    assert float(gradient_penalty(_linear_critic(3.0), real, fake, 0)) == pytest.approx(4.0, rel=1e-5)
    inp = keras.Input((4, 4, 3))
    x = keras.layers.Conv2D(2, 3, activation="tanh")(inp)
    critic = keras.Model(inp, keras.layers.Dense(1)(keras.layers.Flatten()(x)))
    with tf.GradientTape() as tape:
        gp = gradient_penalty(critic, real, fake, 0)
    grads = tape.gradient(gp, critic.trainable_variables)
    assert float(gp) > 0.0
    # every kernel gets a finite second-order gradient (a bias cannot change d critic / dx: None)
    kernels = [g for v, g in zip(critic.trainable_variables, grads) if v.name == "kernel"]
    assert len(kernels) == 2
    assert all(g is not None and np.all(np.isfinite(g)) and np.any(g != 0) for g in kernels)


def test_r1_penalty_is_the_squared_input_gradient_on_real_images_only():
    real, fake = _pair()
    # linear D with ||w|| = 3: every real image's gradient is w -> mean ||w||^2 = 9
    assert float(r1_penalty(_linear_critic(3.0), real, fake)) == pytest.approx(9.0, rel=1e-5)
    # only the real half counts: D(x) = sum(x^2) has gradient 2x, so the penalty is mean_i 4 ||real_i||^2
    inp = keras.Input((4, 4, 3))
    total = keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")
    square = keras.Model(inp, total(keras.layers.Flatten()(keras.layers.Multiply()([inp, inp]))))
    hand = float(np.mean(4 * np.sum(np.square(real.numpy()), axis=(1, 2, 3))))
    assert float(r1_penalty(square, real, 10 * fake)) == pytest.approx(hand, rel=1e-5)
    # and it trains D: a finite, non-zero second-order gradient reaches the kernels
    x = keras.layers.Conv2D(2, 3, activation="tanh")(inp)
    critic = keras.Model(inp, keras.layers.Dense(1)(keras.layers.Flatten()(x)))
    with tf.GradientTape() as tape:
        r1 = r1_penalty(critic, real, fake)
    kernels = [g for v, g in zip(critic.trainable_variables, tape.gradient(r1, critic.trainable_variables))
               if v.name == "kernel"]
    assert len(kernels) == 2 and all(np.all(np.isfinite(g)) and np.any(g != 0) for g in kernels)


def test_pixel_mse_hand_value():
    hr = np.zeros((1, 2, 2, 3), np.float32)
    sr = np.full((1, 2, 2, 3), 0.5, np.float32)
    sr[0, 0, 0, 0] = 1.5
    hand = (11 * 0.25 + 1.5**2) / 12
    assert float(pixel_mse(hr, sr)) == pytest.approx(hand, rel=1e-6)


def test_per_pix_loss_uses_config_weights():
    cfg = section(LossConfig, w_mse=2.0, w_vgg=0.5, w_adv=0.1)
    parts = {"mse": tf.constant(1.5), "vgg": tf.constant(4.0), "adv": tf.constant(-3.0)}
    assert float(per_pix_loss(parts, cfg)) == pytest.approx(2.0 * 1.5 + 0.5 * 4.0 + 0.1 * -3.0)
    assert float(per_pix_loss({"mse": tf.constant(1.5)}, cfg)) == pytest.approx(3.0)
    with pytest.raises(KeyError, match="typo"):
        per_pix_loss({"typo": 1.0}, cfg)


# --------------------------------------------------------------------------- VGG


def test_vgg_preprocess_matches_keras_caffe():
    x = np.random.default_rng(0).random((2, 3, 3, 3), dtype=np.float32)
    expected = keras.applications.vgg19.preprocess_input(x * 255.0)
    np.testing.assert_allclose(VggPreprocess()(x), expected, rtol=1e-5, atol=1e-4)


def test_vgg_layer_validation():
    with pytest.raises(ValueError, match="block5_conv4") as err:
        build_vgg_extractor(section(VggConfig, layer="block9_conv9"), 0)
    assert "block9_conv9" in str(err.value) and "block2_conv2" in str(err.value)


@pytest.fixture(scope="module")
def vgg22() -> keras.Model:
    return build_vgg_extractor(section(VggConfig, layer="block2_conv2", weights="random"), 42)


def test_vgg_shapes_and_frozen(vgg22):
    x = np.random.default_rng(0).random((2, 16, 16, 3), dtype=np.float32)
    assert tuple(vgg22(x).shape) == (2, 8, 8, 128)  # one pool before block2
    assert not vgg22.trainable_weights
    vgg54 = build_vgg_extractor(section(VggConfig, layer="block5_conv4", weights="random"), 42)
    assert tuple(vgg54(x).shape) == (2, 1, 1, 512)  # four pools before block5
    assert vgg54.layers[-1].name == "block5_conv4"


def test_vgg_random_is_seeded(vgg22):
    x = np.random.default_rng(1).random((1, 12, 12, 3), dtype=np.float32)
    same = build_vgg_extractor(section(VggConfig, layer="block2_conv2", weights="random"), 42)
    other = build_vgg_extractor(section(VggConfig, layer="block2_conv2", weights="random"), 43)
    np.testing.assert_array_equal(same(x), vgg22(x))
    assert not np.allclose(other(x), vgg22(x))
    assert float(np.std(vgg22(x))) > 1e-3  # random features are not degenerate


def test_vgg_loss_zero_for_identical_and_scaled(vgg22):
    rng = np.random.default_rng(2)
    hr = rng.random((2, 12, 12, 3), dtype=np.float32)
    sr = rng.random((2, 12, 12, 3), dtype=np.float32)
    assert float(vgg_loss(vgg22, hr, hr, 12.75)) == 0.0
    hand = np.mean(np.square(vgg22(hr).numpy() / 12.75 - vgg22(sr).numpy() / 12.75))
    assert float(vgg_loss(vgg22, hr, sr, 12.75)) == pytest.approx(float(hand), rel=1e-5)


def test_vgg_imagenet_weights():
    cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
    if not (cache / "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5").exists():
        pytest.skip("needs internet: ImageNet VGG19 weights are not cached and cannot be downloaded here")
    model = build_vgg_extractor(section(VggConfig, layer="block2_conv2", weights="imagenet"), 0)
    assert tuple(model(np.zeros((1, 8, 8, 3), np.float32)).shape) == (1, 4, 4, 128)
